"""The Fireworks SDK's save options on weightsync's TrainingClient: its defaults, its
spelling of checkpoint types, and a clear refusal of what weightsync does not implement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _support.training import model_step
from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.trainer import TrainingClient


def test_deltas_default_to_the_sdks_arc_v2(tmp_path: Path, model: Any, optimizer: Any) -> None:
    client = TrainingClient(model, storage=tmp_path, optimizer=optimizer)
    assert client.compression_format == "arc_v2"
    client.save_weights_for_sampler_ext("b")
    model_step(model, optimizer, seed=1)
    delta = client.save_weights_for_sampler_ext("d")
    manifest = client.store.read_manifest(delta.snapshot_name)
    assert manifest.kind == "delta" and manifest.compression_format == "arc_v2"


@pytest.mark.parametrize(("spelled", "kind"), [("BASE", "base"), ("Delta", "delta")])
def test_checkpoint_types_are_taken_in_any_case(
    tmp_path: Path, model: Any, spelled: str, kind: str
) -> None:
    client = TrainingClient(model, storage=tmp_path)
    client.save_weights_for_sampler_ext("first")
    result = client.save_weights_for_sampler_ext("second", spelled)
    assert result.checkpoint_type == kind
    assert client.store.read_manifest(result.snapshot_name).kind == kind


def test_sdk_options_it_does_not_implement_are_refused_before_writing(
    tmp_path: Path, model: Any
) -> None:
    client = TrainingClient(model, storage=tmp_path)
    with pytest.raises(UnsupportedOperationError, match="ttl_seconds is not supported"):
        client.save_weights_for_sampler_ext("x", None, 3600)
    with pytest.raises(InvalidInputError, match="requires checkpoint_type='merged_base'"):
        client.save_weights_for_sampler_ext("x", "base", None, "source")
    with pytest.raises(UnsupportedOperationError, match="metadata"):
        client.save_weights_for_sampler_ext("x", metadata={"decision_calibration": {}})
    with pytest.raises(UnsupportedOperationError, match="ttl_seconds and overwrite"):
        client.save_state("s", overwrite=True)
    with pytest.raises(UnsupportedOperationError, match="weights_access_token"):
        client.load_state("s", "token")
    assert client.store.list_snapshots() == []  # nothing was written
