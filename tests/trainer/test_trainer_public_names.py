"""The trainer package's public door."""

from __future__ import annotations

import dataclasses

import weightsync
import weightsync.trainer as trainer


def test_public_names_are_pinned() -> None:
    assert sorted(trainer.__all__) == ["CHECKPOINT_TYPES", "SaveSamplerResult", "TrainingClient"]
    assert weightsync.TrainingClient is trainer.TrainingClient
    assert weightsync.SaveSamplerResult is trainer.SaveSamplerResult
    assert trainer.CHECKPOINT_TYPES == ("base", "delta", "merged_base")


def test_save_result_takes_path_and_name_positionally_and_extras_by_keyword() -> None:
    result = trainer.SaveSamplerResult("/snaps/a-0123abcd", "a-0123abcd", payload_bytes=3)
    assert (result.path, result.snapshot_name, result.payload_bytes) == (
        "/snaps/a-0123abcd",
        "a-0123abcd",
        3,
    )
    assert (result.checkpoint_type, result.kind, result.parent) == ("base", "base", None)
    fields = [f.name for f in dataclasses.fields(result)]
    assert fields[:3] == ["path", "snapshot_name", "checkpoint_type"]
    assert all(f.kw_only for f in dataclasses.fields(result)[2:])
