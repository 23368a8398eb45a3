"""Promotion: bases load in transformers; deltas are refused unless materialized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _support.bits import int_bits
from _support.training import model_step
from weightsync.errors import InvalidInputError, SnapshotNotFoundError, UnsupportedOperationError
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(120)


def _assert_loads_as(out: Path, expected: dict[str, torch.Tensor]) -> Any:
    promoted = AutoModelForCausalLM.from_pretrained(out)
    assert promoted.dtype == torch.bfloat16
    state = promoted.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(int_bits(state[name]), int_bits(tensor)), name
    # Tied embeddings come back tied.
    assert promoted.lm_head.weight.data_ptr() == promoted.model.embed_tokens.weight.data_ptr()
    return promoted


def test_a_base_promotes_to_a_model_transformers_loads(
    tmp_path: Path, model: Any, tokenizer_dir: Path
) -> None:
    client = TrainingClient(model, storage=tmp_path / "snaps", tokenizer_dir=tokenizer_dir)
    result = client.save_weights_for_sampler_ext("release")

    out = client.promote_checkpoint(result.snapshot_name, tmp_path / "release")
    assert out == tmp_path / "release"
    assert not (out / "weightsync.json").exists()
    promoted = _assert_loads_as(out, client.exported_weights())
    tokenizer = AutoTokenizer.from_pretrained(out)
    input_ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert promoted(input_ids=input_ids).logits.shape[-1] == model.config.vocab_size
    # The plain name of this session's snapshot works too.
    assert client.promote_checkpoint("release", tmp_path / "again") == tmp_path / "again"


def test_a_delta_is_refused_naming_its_base_unless_materialized(
    tmp_path: Path, model: Any, optimizer: torch.optim.Optimizer
) -> None:
    client = TrainingClient(model, storage=tmp_path / "snaps", optimizer=optimizer)
    base = client.save_weights_for_sampler_ext("base")
    model_step(model, optimizer, seed=1)
    delta = client.save_weights_for_sampler_ext("delta")

    with pytest.raises(InvalidInputError) as refused:
        client.promote_checkpoint(delta.snapshot_name, tmp_path / "refused")
    assert base.snapshot_name in str(refused.value)
    assert "materialize=True" in str(refused.value)
    assert not (tmp_path / "refused").exists()

    out = client.promote_checkpoint(delta.snapshot_name, tmp_path / "rebuilt", materialize=True)
    _assert_loads_as(out, client.exported_weights())


def test_promotion_refuses_plain_modules_missing_snapshots_and_busy_dirs(
    tmp_path: Path, model: Any
) -> None:
    plain = TrainingClient(torch.nn.Linear(3, 2), storage=tmp_path / "plain")
    plain_result = plain.save_weights_for_sampler_ext("linear")
    with pytest.raises(UnsupportedOperationError, match="transformers cannot load"):
        plain.promote_checkpoint(plain_result.snapshot_name, tmp_path / "out-plain")

    client = TrainingClient(model, storage=tmp_path / "snaps")
    with pytest.raises(SnapshotNotFoundError, match="never-saved"):
        client.promote_checkpoint("never-saved", tmp_path / "out-missing")
    result = client.save_weights_for_sampler_ext("busy")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(InvalidInputError, match="not an empty directory"):
        client.promote_checkpoint(result.snapshot_name, busy)
    assert (busy / "keep.txt").read_text() == "user data"


def test_a_lora_snapshot_cannot_be_promoted_by_a_full_parameter_client(
    tmp_path: Path, model: Any
) -> None:
    from weightsync.toymodel import build_model

    lora_client = TrainingClient(build_model("tiny"), storage=tmp_path, lora_rank=2)
    adapter = lora_client.save_weights_for_sampler_ext("adapter")
    full_client = TrainingClient(model, storage=tmp_path)
    with pytest.raises(UnsupportedOperationError, match="LoRA adapter"):
        full_client.promote_checkpoint(adapter.snapshot_name, tmp_path / "out")
