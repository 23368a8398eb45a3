"""The recorded trajectory replays training bit for bit, and the method list is complete."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightsync.bench.methods import FULL_RELOAD, bench_methods
from weightsync.bench.rl_updates import rl_snapshots, sampler_state_dict
from weightsync.bench.trajectory import Trajectory, step_changes
from weightsync.codec import DEFAULT_CODEC, list_codecs
from weightsync.errors import UnknownCodecError
from weightsync.toymodel import build_model


@pytest.fixture(scope="module")
def snapshots() -> list[dict[str, torch.Tensor]]:
    return list(rl_snapshots(build_model("tiny", seed=0), lr=1e-5, num_steps=3))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("replay_dtype", [torch.float32, torch.bfloat16])
def test_replay_reproduces_every_step_bit_for_bit(
    snapshots: list[dict[str, torch.Tensor]], replay_dtype: torch.dtype
) -> None:
    trajectory = Trajectory(lr=1e-5, initial=snapshots[0])
    for old, new in itertools.pairwise(snapshots):
        trajectory.steps.append(step_changes(old, new))
    assert all(0 < trajectory.changed_fraction(s) < 1 for s in (1, 2, 3))

    replay = build_model("tiny", seed=1, dtype=replay_dtype)  # different weights to start
    trajectory.load_initial(replay)
    for step in (1, 2, 3):
        trajectory.apply_step(replay, step)
        got = sampler_state_dict(replay)
        assert got.keys() == snapshots[step].keys()
        for name, tensor in got.items():
            assert torch.equal(tensor.view(torch.int16), snapshots[step][name].view(torch.int16))


def test_methods_cover_the_field_and_every_codec() -> None:
    methods = bench_methods()
    names = [m.name for m in methods]
    assert names[0] == FULL_RELOAD and methods[0].checkpoint_type == "base"
    assert {m.codec for m in methods} == set(list_codecs(include_read_only=True))
    assert len(names) == len(set(names))
    assert next(m.name for m in bench_methods(("full", DEFAULT_CODEC))) == FULL_RELOAD
    with pytest.raises(UnknownCodecError, match="known: "):
        bench_methods(("no-such-codec",))
