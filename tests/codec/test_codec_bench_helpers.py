"""The benchmark helpers the codec numbers come from: RL-like updates and measurements."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightsync.bench.codecs import density_sweep, measure_codec, synthetic_rl_update
from weightsync.bench.rl_updates import rl_snapshots, sampler_state_dict
from weightsync.codec.stats import change_stats
from weightsync.errors import InvalidInputError
from weightsync.toymodel import build_model


@pytest.mark.timeout(120)
def test_rl_snapshots_contract() -> None:
    model = build_model("tiny", seed=0)
    initial = {k: v.clone() for k, v in sampler_state_dict(model).items()}
    snapshots = list(rl_snapshots(model, lr=1e-5, num_steps=2, seed=0))
    assert len(snapshots) == 3
    assert "lm_head.weight" not in snapshots[0]  # tied to the embedding, dropped
    assert "model.embed_tokens.weight" in snapshots[0]
    for snap in snapshots:
        assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in snap.values())
    assert all(
        torch.equal(initial[k].view(torch.int16), snapshots[0][k].view(torch.int16))
        for k in initial
    )
    for old, new in itertools.pairwise(snapshots):
        stats = change_stats(old, new)
        assert 0.001 < stats.changed_fraction < 0.6
        assert stats.one_step_fraction > 0.5
    # Deterministic for a seed.
    again = list(rl_snapshots(build_model("tiny", seed=0), lr=1e-5, num_steps=2, seed=0))
    for a, b in zip(snapshots, again, strict=True):
        assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_rl_snapshots_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="fp32"):
        next(rl_snapshots(build_model("tiny", dtype=torch.bfloat16), lr=1e-6, num_steps=1))
    with pytest.raises(InvalidInputError):
        next(rl_snapshots(build_model("tiny"), lr=0.0, num_steps=1))


@pytest.mark.parametrize("codec", ["wsdelta1", "xor-zstd", "full"])
def test_measure_codec_reports_size_and_losslessness(codec: str) -> None:
    old, new = synthetic_rl_update(1 << 16, 0.02, seed=3)
    sets_old = {"a": old, "b": old[:1000].clone()}
    sets_new = {"a": new, "b": new[:1000].clone()}
    m = measure_codec(codec, sets_old, sets_new, threads=2)
    assert m.lossless
    assert m.full_bytes == 2 * (old.numel() + 1000)
    assert m.num_elements == old.numel() + 1000
    assert m.encode_s > 0 and m.decode_s > 0
    if codec == "full":
        assert m.payload_bytes == m.full_bytes
    else:
        assert m.payload_bytes < m.full_bytes / 5


def test_density_sweep_hits_densities() -> None:
    rows = density_sweep(["wsdelta1"], num_elements=1 << 18, densities=(0.01, 0.2))
    assert [r.codec for r in rows] == ["wsdelta1", "wsdelta1"]
    for row in rows:
        assert abs(row.changed_fraction - row.target_fraction) < 0.1 * row.target_fraction
        assert 1.0 < row.over_bound < 1.2
