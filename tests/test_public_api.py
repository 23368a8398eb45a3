"""Pins the public names of `weightsync` and the reference fields of `WeightSyncer`."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import weightsync
from weightsync import errors

PUBLIC_NAMES = {
    "WeightSyncer",
    "DeploymentManager",
    "DeploymentConfig",
    "DeploymentSampler",
    "TrainingClient",
    "SaveSamplerResult",
    "SnapshotStore",
    "open_storage",
    "get_codec",
    "list_codecs",
    "DEFAULT_CODEC",
    "DEFAULT_CHECKSUM",
    "__version__",
}
ERROR_NAMES = {
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.WeightSyncError)
}

# The reference page's constructor table, in order, with its defaults.
REFERENCE_FIELDS = [
    ("policy_client", dataclasses.MISSING),
    ("deploy_mgr", None),
    ("deployment_id", None),
    ("base_model", ""),
    ("hotload_timeout", 600),
    ("first_checkpoint_type", "base"),
    ("compression_format", "arc_v2"),
    ("warmup_after_hotload", True),
    ("warmup_max_retries", 10),
    ("reset_prompt_cache", True),
    ("lora_rank", 0),
]


def test_all_lists_exactly_the_public_names_and_every_error_class():
    assert set(weightsync.__all__) == PUBLIC_NAMES | ERROR_NAMES
    assert "WeightSyncError" in ERROR_NAMES and "HotloadFailedError" in ERROR_NAMES


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES | ERROR_NAMES))
def test_every_public_name_resolves(name):
    value = getattr(weightsync, name)
    assert value is not None
    assert name in dir(weightsync)


def test_public_names_come_from_their_modules():
    from weightsync.codec import DEFAULT_CODEC, get_codec
    from weightsync.deployment import DeploymentManager
    from weightsync.syncer import WeightSyncer

    assert weightsync.WeightSyncer is WeightSyncer
    assert weightsync.DeploymentManager is DeploymentManager
    assert weightsync.get_codec is get_codec
    assert weightsync.DEFAULT_CODEC == DEFAULT_CODEC
    assert weightsync.__version__.count(".") == 2


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = weightsync.NoSuchThing


def test_importing_the_package_does_not_import_torch_or_transformers():
    code = (
        "import sys, weightsync\n"
        "weightsync.DeploymentManager; weightsync.WeightSyncer; weightsync.HotloadFailedError\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "[]"


def test_weight_syncer_constructor_matches_the_reference_table():
    fields = [f for f in dataclasses.fields(weightsync.WeightSyncer) if f.init]
    positional = [f for f in fields if not f.kw_only]
    assert [f.name for f in positional] == [name for name, _ in REFERENCE_FIELDS]
    for f, (name, default) in zip(positional, REFERENCE_FIELDS, strict=True):
        assert f.default == default, name
    # Additions are keyword-only with defaults.
    for f in fields:
        if f.kw_only:
            assert (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )


def test_weight_syncer_methods_keep_the_reference_signatures():
    ws = weightsync.WeightSyncer
    assert list(inspect.signature(ws.save_and_hotload).parameters) == [
        "self",
        "name",
        "checkpoint_type",
    ]
    assert inspect.signature(ws.save_only).parameters["checkpoint_type"].default is None
    assert list(inspect.signature(ws.hotload).parameters)[:3] == [
        "self",
        "snapshot_name",
        "checkpoint_type",
    ]
    ready = inspect.signature(ws.wait_for_hotload_ready).parameters
    assert ready["timeout_s"].default == 300 and ready["poll_interval_s"].default == 5
    for name in ("check_deployment_state", "reset_delta_chain", "get_deployment_sampler"):
        assert callable(getattr(ws, name))


def test_deployment_manager_constructor_keeps_the_reference_parameters():
    params = list(inspect.signature(weightsync.DeploymentManager).parameters)
    assert params[:6] == [
        "api_key",
        "base_url",
        "inference_url",
        "hotload_api_url",
        "additional_headers",
        "verify_ssl",
    ]
