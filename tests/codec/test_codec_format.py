"""The default codec's format is pinned byte for byte, and its size stays near the bound."""

from __future__ import annotations

import pytest
import torch

from _support.bits import int_bits
from weightsync.bench.codecs import synthetic_rl_update
from weightsync.codec import DEFAULT_CODEC, get_codec
from weightsync.codec.stats import change_stats

# 16x16 bf16 linspace(-2, 2) with five changes (+1, -1, +2, +300, -1 key steps):
# header, one sparse chunk (k=3, 5 changes), zstd symbols, 2 low-bit bytes, zstd
# big magnitudes, xxh3_64 trailer. See docs/codecs.md for the layout.
SPARSE_GOLDEN = bytes.fromhex(
    "57534431010102100000000000000010000000000000000000400000000000010000000103050000"
    "000e000000020000000b00000028b52ffd20052900000148034c25036428b52ffd2002110000a902"
    "c1650f76a6e5de1e"
)
# 2x5 bf16 with four changes: the sparse streams would not pay, so one dense chunk.
DENSE_GOLDEN = bytes.fromhex(
    "575344310101020200000000000000050000000000000000004000000000000100000002000a0000"
    "00140000000000000000000000003f81be803f000000003f4000c0003ee040e8bf329ca3919598e5"
    "d7"
)


def _sparse_pair() -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.linspace(-2, 2, 256).to(torch.bfloat16).reshape(16, 16)
    b = int_bits(old).clone().view(-1)
    b[3] += 1
    b[100] -= 1
    b[101] += 2
    b[200] += 300
    b[255] -= 1
    return old, b.view(torch.bfloat16).reshape(16, 16)


def _dense_pair() -> tuple[torch.Tensor, torch.Tensor]:
    values = [0.5, -0.25, 1.0, 0.0, -0.0, 3.0, -2.0, 0.125, 7.0, -1.5]
    old = torch.tensor(values, dtype=torch.bfloat16).reshape(2, 5)
    b = int_bits(old).clone().view(-1)
    b[1] += 1
    b[4] = 0
    b[5] -= 1
    b[9] += 40
    return old, b.view(torch.bfloat16).reshape(2, 5)


def test_default_codec_is_wsdelta1() -> None:
    assert DEFAULT_CODEC == "wsdelta1"


@pytest.mark.parametrize(
    ("make_pair", "golden"),
    [(_sparse_pair, SPARSE_GOLDEN), (_dense_pair, DENSE_GOLDEN)],
    ids=["sparse", "dense"],
)
def test_golden_bytes(make_pair, golden: bytes) -> None:  # type: ignore[no-untyped-def]
    """Encoder output is pinned (zstandard is pinned too); the decoder must read the
    pinned bytes whatever a future encoder emits."""
    old, new = make_pair()
    codec = get_codec("wsdelta1")
    assert codec.encode(old, new) == golden
    assert torch.equal(int_bits(codec.decode(golden, old)), int_bits(new))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("density", [0.003, 0.01, 0.05, 0.3])
def test_default_codec_within_5_percent_of_bound(density: float) -> None:
    old, new = synthetic_rl_update(1 << 21, density, seed=1)
    stats = change_stats(old, new)
    assert abs(stats.changed_fraction - density) < 0.1 * density
    assert stats.one_step_fraction > 0.6
    payload = get_codec(DEFAULT_CODEC).encode(old, new)
    assert len(payload) <= 1.05 * stats.bound_bytes
    # And far below the anchors that do not model ulp steps.
    assert len(payload) < 0.6 * len(get_codec("gap-zstd").encode(old, new))
