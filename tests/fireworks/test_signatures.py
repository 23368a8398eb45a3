"""weightsync's public classes take the Fireworks SDK's parameters, in its positional order,
with its return conventions; weightsync's extras come after them, keyword-only or defaulted.

Compared with the installed SDK (`fireworks-ai` 1.2.30) by introspection, not a copy.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from fireworks.training.sdk import DeploymentManager as SdkDeploymentManager
from fireworks.training.sdk import DeploymentSampler as SdkDeploymentSampler
from fireworks.training.sdk import WeightSyncer as SdkWeightSyncer
from fireworks.training.sdk.client import FiretitanTrainingClient
from fireworks.training.sdk.deployment import DEFAULT_DELTA_COMPRESSION

from weightsync import DeploymentManager, DeploymentSampler, TrainingClient, WeightSyncer

# (ours, the SDK's): methods whose every SDK parameter ours takes, in the same order.
METHODS = [
    (WeightSyncer.save_and_hotload, SdkWeightSyncer.save_and_hotload),
    (WeightSyncer.save_only, SdkWeightSyncer.save_only),
    (WeightSyncer.hotload, SdkWeightSyncer.hotload),
    (WeightSyncer.check_deployment_state, SdkWeightSyncer.check_deployment_state),
    (WeightSyncer.wait_for_hotload_ready, SdkWeightSyncer.wait_for_hotload_ready),
    (WeightSyncer.reset_delta_chain, SdkWeightSyncer.reset_delta_chain),
    (WeightSyncer.get_deployment_sampler, SdkWeightSyncer.get_deployment_sampler),
    (WeightSyncer.get_sampling_client, SdkWeightSyncer.get_sampling_client),
    (DeploymentManager.__init__, SdkDeploymentManager.__init__),
    (DeploymentManager.hotload, SdkDeploymentManager.hotload),
    (DeploymentManager.hotload_check_status, SdkDeploymentManager.hotload_check_status),
    (DeploymentManager.wait_for_hotload, SdkDeploymentManager.wait_for_hotload),
    (DeploymentManager.hotload_and_wait, SdkDeploymentManager.hotload_and_wait),
    (DeploymentManager.warmup, SdkDeploymentManager.warmup),
    (DeploymentManager.create_or_get, SdkDeploymentManager.create_or_get),
    (DeploymentManager.wait_for_ready, SdkDeploymentManager.wait_for_ready),
    (DeploymentManager.get, SdkDeploymentManager.get),
    (DeploymentManager.delete, SdkDeploymentManager.delete),
    (DeploymentManager.scale_to_zero, SdkDeploymentManager.scale_to_zero),
    (DeploymentSampler.sample_with_tokens, SdkDeploymentSampler.sample_with_tokens),
    (DeploymentSampler.sample_with_prompt_tokens, SdkDeploymentSampler.sample_with_prompt_tokens),
    (
        TrainingClient.save_weights_for_sampler_ext,
        FiretitanTrainingClient.save_weights_for_sampler_ext,
    ),
    (TrainingClient.save_state, FiretitanTrainingClient.save_state),
    (TrainingClient.load_state, FiretitanTrainingClient.load_state),
    (TrainingClient.load_state_with_optimizer, FiretitanTrainingClient.load_state_with_optimizer),
]
#: SDK parameters weightsync does not take, and why (docs/fireworks.md says so too).
NOT_TAKEN = {
    # The SDK forwards the rest of a request's fields; weightsync names each one it takes.
    ("sample_with_tokens", "kwargs"),
    ("sample_with_prompt_tokens", "kwargs"),
    ("sample_with_prompt_tokens", "stop"),
    ("sample_with_prompt_tokens", "prompt_cache_key"),
    ("sample_with_prompt_tokens", "additional_headers_snapshot"),
    # `account_id=` is refused by the SDK itself; weightsync's extras are keyword-only.
    ("__init__", "kwargs"),
}


def _positional(fn):
    return [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


@pytest.mark.parametrize(("ours", "theirs"), METHODS, ids=lambda f: f.__qualname__)
def test_every_sdk_parameter_is_taken_in_the_sdks_order(ours, theirs):
    ours_sig = inspect.signature(ours).parameters
    wanted = [
        p.name
        for p in inspect.signature(theirs).parameters.values()
        if (theirs.__name__, p.name) not in NOT_TAKEN
    ]
    missing = [name for name in wanted if name not in ours_sig]
    assert not missing, f"{ours.__qualname__} lacks the SDK's {missing}"
    # The SDK's positional parameters are ours, in order, at the same positions.
    theirs_positional = [p.name for p in _positional(theirs) if p.name in wanted]
    ours_positional = [p.name for p in _positional(ours)]
    assert ours_positional[: len(theirs_positional)] == theirs_positional
    # What the SDK makes optional, ours does too (our extras never become required).
    for name, param in ours_sig.items():
        if name not in wanted and name != "self":
            assert param.default is not param.empty or param.kind is param.VAR_KEYWORD, name


def test_the_weight_syncer_fields_are_the_sdks_with_the_same_defaults():
    theirs = {f.name: f for f in dataclasses.fields(SdkWeightSyncer) if f.init}
    ours = [f for f in dataclasses.fields(WeightSyncer) if f.init and not f.kw_only]
    assert [f.name for f in ours] == list(theirs)
    for field in ours:
        assert field.default == theirs[field.name].default, field.name
    assert WeightSyncer.compression_format == DEFAULT_DELTA_COMPRESSION == "arc_v2"
    default = inspect.signature(TrainingClient).parameters["compression_format"].default
    assert default == DEFAULT_DELTA_COMPRESSION


def test_the_sdks_return_conventions():
    assert inspect.signature(DeploymentManager.hotload_and_wait).return_annotation == "bool"
    assert inspect.signature(DeploymentManager.wait_for_hotload).return_annotation == "bool"
    assert inspect.signature(DeploymentManager.warmup).return_annotation == "bool"
    assert inspect.signature(WeightSyncer.hotload).return_annotation == "bool"
    assert inspect.signature(WeightSyncer.save_and_hotload).return_annotation == "str | None"
    assert isinstance(dataclasses.fields(WeightSyncer), tuple)
    timing = {f.name: f for f in dataclasses.fields(WeightSyncer)}["last_timing"]
    assert isinstance(timing.default_factory(), dict)  # type: ignore[misc]
