"""TorchEngine.apply_patches: in place, exact outputs of the patched weights, exact undo."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from _support.engine_steps import PROMPT, RecordingGuard
from _support.models import snapshot_tensors, toy_model
from weightsync.codec import Patch, get_codec
from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.torch_engine import TorchEngine


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _greedy(engine: TorchEngine) -> tuple[list[int], list[float] | None]:
    request = GenerateRequest(prompt_token_ids=PROMPT, max_tokens=8, temperature=0.0, logprobs=0)
    result = engine.generate(request, step_guard=RecordingGuard())
    return result.token_ids, result.logprobs


def _updated(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training step's worth of change: every tensor moves, most elements a little."""
    generator = torch.Generator().manual_seed(11)
    return {
        name: (t.float() + 0.05 * torch.randn(t.shape, generator=generator)).to(t.dtype)
        for name, t in tensors.items()
    }


def test_patched_engine_equals_a_model_with_the_new_weights(model: Any) -> None:
    old = snapshot_tensors(model)
    new = _updated(old)
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model.config.to_dict(), old)
    before_tokens, before_logprobs = _greedy(engine)
    pointers = {n: t.data_ptr() for n, t in engine.named_weights().items()}

    codec = get_codec("full")
    live = engine.named_weights()
    patches = {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in new}
    undo = engine.apply_patches(patches)
    # The cached prompt KV belongs to the old weights; the replica drops it after a swap.
    assert engine.reset_prompt_cache("all") > 0

    live = engine.named_weights()
    assert {n: t.data_ptr() for n, t in live.items()} == pointers  # nothing reallocated
    for name in new:
        assert torch.equal(_bits(live[name]), _bits(new[name])), name

    reference = toy_model()
    reference.load_state_dict(new, strict=False)  # lm_head is tied to the embeddings
    expected = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None
    )[0, len(PROMPT) :].tolist()
    fresh = TorchEngine(cache_block_tokens=4)
    fresh.load_base(model.config.to_dict(), new)
    tokens, logprobs = _greedy(engine)
    assert tokens == expected
    assert (tokens, logprobs) == _greedy(fresh)  # bit-equal logprobs too
    assert tokens != before_tokens

    engine.apply_patches(undo)
    engine.reset_prompt_cache("all")
    for name in old:
        assert torch.equal(_bits(engine.named_weights()[name]), _bits(old[name])), name
    assert _greedy(engine) == (before_tokens, before_logprobs)


def test_sparse_patch_writes_only_its_positions(engine: TorchEngine) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    target = engine.named_weights()[name]
    before = target.clone()
    positions = np.array([0, 5, 100, target.numel() - 1], dtype=np.int64)
    values = np.array([0x3F80, 0xBF80, 0x0000, 0x7FC0], dtype=np.uint16)  # 1, -1, 0, NaN
    undo = engine.apply_patches({name: Patch(positions, values)})
    flat = target.view(-1).view(torch.int16).numpy().view(np.uint16)
    assert flat[positions].tolist() == values.tolist()
    changed = np.flatnonzero(flat != before.view(-1).view(torch.int16).numpy().view(np.uint16))
    assert set(changed.tolist()) <= set(positions.tolist())
    engine.apply_patches(undo)
    assert torch.equal(_bits(target), _bits(before))


def _norm_patch(engine: TorchEngine) -> Patch:
    norm = engine.named_weights()["model.norm.weight"]
    return Patch(None, np.full(norm.numel(), 0x4000, dtype=np.uint16))  # all 2.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"model.nope.weight": Patch(None, np.zeros(4, np.uint16))}, "no such weight"),
        ({"model.norm.weight": Patch(None, np.zeros(5, np.uint16))}, "has 5 values"),
        ({"model.norm.weight": Patch(None, np.zeros(32, np.uint32))}, "4-byte values"),
        (
            {"model.norm.weight": Patch(np.array([3, 32], np.int64), np.zeros(2, np.uint16))},
            "outside the weight's 32 elements",
        ),
        (
            {"model.norm.weight": Patch(np.array([3], np.int64), np.zeros(2, np.uint16))},
            "1 positions but 2 values",
        ),
    ],
)
def test_bad_patches_change_nothing(
    engine: TorchEngine, bad: dict[str, Patch], message: str
) -> None:
    before = {n: t.clone() for n, t in engine.named_weights().items()}
    patches = {"model.layers.1.input_layernorm.weight": _norm_patch(engine), **bad}
    with pytest.raises(InvalidInputError, match=message):
        engine.apply_patches(patches)
    for name, tensor in engine.named_weights().items():
        assert torch.equal(_bits(tensor), _bits(before[name])), name
