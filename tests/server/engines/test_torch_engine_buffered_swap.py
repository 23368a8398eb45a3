"""The torch engine's buffered swap on its own: staging, the swap, and a spare that is
recopied whenever it may differ from the live weights. Weights compared bit for bit."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from _support.models import snapshot_tensors
from weightsync.codec import Patch
from weightsync.codec.bits import bits
from weightsync.errors import InvalidInputError
from weightsync.server.engines.torch_engine import TorchEngine

pytestmark = pytest.mark.timeout(60)


def _buffered(model: Any) -> tuple[TorchEngine, dict[str, torch.Tensor]]:
    engine = TorchEngine(buffered_swap=True)
    weights = snapshot_tensors(model)
    engine.load_base(model.config.to_dict(), weights)
    return engine, weights


def test_the_model_computes_with_what_named_weights_reports(model: Any) -> None:
    """A tied embedding and head stay one tensor across swaps."""
    engine, _weights = _buffered(model)
    for step in range(3):
        live = engine.named_weights()
        name = sorted(live)[step]
        patch = Patch(np.array([0, 1], dtype=np.int64), bits(live[name]).reshape(-1)[:2] ^ 1)
        patches = {name: patch}
        engine.stage_patches(patches)
        engine.apply_patches(patches, keep_undo=False)
        engine.settle()
        loaded = engine._require_loaded()
        state = loaded.model.state_dict()
        for n, t in engine.named_weights().items():
            assert state[n].data_ptr() == t.data_ptr(), n
        if loaded.model.config.tie_word_embeddings:
            assert (
                state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
            )


def test_a_patch_that_cannot_be_staged_leaves_the_live_weights_and_the_next_load_exact(
    model: Any,
) -> None:
    engine, weights = _buffered(model)
    name = sorted(engine.named_weights())[0]
    before = bits(engine.named_weights()[name]).copy()
    values = before.reshape(-1)[:3] ^ 1
    unordered = {name: Patch(np.array([2, 0, 1], dtype=np.int64), values)}
    with pytest.raises(InvalidInputError, match="could not be staged"):
        engine.stage_patches(unordered)
    assert np.array_equal(bits(engine.named_weights()[name]), before)
    good = {name: Patch(np.array([0, 1, 2], dtype=np.int64), values)}
    engine.stage_patches(good)
    engine.apply_patches(good, keep_undo=False)
    expected = before.copy().reshape(-1)
    expected[:3] = values
    assert np.array_equal(bits(engine.named_weights()[name]).reshape(-1), expected)
    # The spare was partly written by the refused patch: it is recopied whole, so the
    # next load over the other copy is exact too.
    engine.settle()
    again = {name: Patch(np.array([5], dtype=np.int64), expected[5:6] ^ 1)}
    engine.stage_patches(again)
    engine.apply_patches(again, keep_undo=False)
    expected[5] ^= 1
    assert np.array_equal(bits(engine.named_weights()[name]).reshape(-1), expected)
    others = {n: t for n, t in engine.named_weights().items() if n != name}
    assert all(torch.equal(t, weights[n]) for n, t in others.items())


def test_an_apply_that_was_not_staged_writes_in_place_and_the_spare_follows(model: Any) -> None:
    engine, _weights = _buffered(model)
    name = sorted(engine.named_weights())[1]
    flat = bits(engine.named_weights()[name]).reshape(-1)
    first = {name: Patch(np.array([0], dtype=np.int64), flat[:1] ^ 1)}
    undo = engine.apply_patches(first)  # not staged: in place, with its undo
    assert undo and flat[0] == first[name].values[0]
    second = {name: Patch(np.array([1], dtype=np.int64), flat[1:2] ^ 1)}
    engine.stage_patches(second)
    engine.apply_patches(second, keep_undo=False)
    now = bits(engine.named_weights()[name]).reshape(-1)
    assert now[0] == first[name].values[0] and now[1] == second[name].values[0]


def test_a_catch_up_stopped_at_any_point_leaves_the_next_load_exact() -> None:
    """`wait` stops the background catch-up after its current tensor; the next stage
    writes what it left. Whichever tensor it stopped at, every copy ends exact."""
    from weightsync.server.engines.spare_weights import SpareWeights

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64).to(torch.bfloat16) for _ in range(8)))
    live = {n: p.data for n, p in model.state_dict(keep_vars=True).items()}
    expected = {n: bits(t).copy().reshape(-1) for n, t in live.items()}
    spare = SpareWeights(model, live)
    gen = np.random.default_rng(0)
    for _ in range(30):
        patches = {}
        for name, flat in expected.items():
            positions = np.unique(gen.integers(0, flat.size, 40)).astype(np.int64)
            values = flat[positions] ^ np.uint16(1)
            flat[positions] = values
            patches[name] = Patch(positions, values)
        spare.stage(patches, live)
        live = spare.swap(live)
        spare.catch_up(live)
        time.sleep(float(gen.random()) * 0.002)  # stop it at a different point each time
        spare.wait()
        held = {n: p.data for n, p in model.state_dict(keep_vars=True).items()}
        for name, flat in expected.items():
            assert held[name].data_ptr() == live[name].data_ptr()
            assert np.array_equal(bits(live[name]).reshape(-1), flat), name
