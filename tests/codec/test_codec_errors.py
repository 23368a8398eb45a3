"""Malformed payloads, mismatched tensors and unknown names fail loudly, never silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _support.bit_patterns import random_bits, ulp_moves
from _support.bits import int_bits
from weightsync.codec import get_codec, list_codecs
from weightsync.errors import (
    ChainError,
    InvalidInputError,
    SnapshotCorruptError,
    UnknownCodecError,
    UnsupportedDtypeError,
)

# Codecs whose payload carries its own header and checksum (Fireworks' bare frames are
# proven by their shard's Adler-32 instead: tests/codec/test_arc_codecs.py).
DELTA_CODECS = [
    c for c in list_codecs() if get_codec(c).needs_old and get_codec(c).shard_layout == "weightsync"
]


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(11)
    old = random_bits(rng, torch.bfloat16, (40, 25), specials=0.05)
    return old, ulp_moves(rng, old, density=0.05)


@pytest.mark.parametrize("codec", DELTA_CODECS)
def test_every_truncation_raises_corrupt(codec: str) -> None:
    old, new = _pair()
    payload = get_codec(codec).encode(old, new)
    for cut in range(len(payload)):
        with pytest.raises(SnapshotCorruptError):
            get_codec(codec).decode_patch(payload[:cut], old)


@pytest.mark.parametrize("codec", DELTA_CODECS)
def test_bit_flips_raise_corrupt(codec: str) -> None:
    old, new = _pair()
    payload = get_codec(codec).encode(old, new)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(payload), size=min(60, len(payload)), replace=False):
        broken = bytearray(payload)
        broken[index] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(SnapshotCorruptError):
            get_codec(codec).decode_patch(bytes(broken), old)


@pytest.mark.parametrize("codec", DELTA_CODECS)
def test_extra_bytes_raise_corrupt(codec: str) -> None:
    old, new = _pair()
    payload = get_codec(codec).encode(old, new)
    with pytest.raises(SnapshotCorruptError):
        get_codec(codec).decode_patch(payload + b"\0", old)


def test_full_codec_wrong_size_raises_corrupt() -> None:
    old, new = _pair()
    with pytest.raises(SnapshotCorruptError):
        get_codec("full").decode_patch(get_codec("full").encode(old, new)[:-1], old)


@pytest.mark.parametrize("codec", DELTA_CODECS)
@pytest.mark.parametrize(
    "other",
    [
        torch.zeros(25, 40, dtype=torch.bfloat16),
        torch.zeros(1000, dtype=torch.bfloat16),
        torch.zeros(40, 25, dtype=torch.float16),
    ],
    ids=["shape", "flat", "dtype"],
)
def test_shape_or_dtype_mismatch_is_detected(codec: str, other: torch.Tensor) -> None:
    old, new = _pair()
    payload = get_codec(codec).encode(old, new)
    with pytest.raises(ChainError, match="parent"):
        get_codec(codec).decode_patch(payload, other)


@pytest.mark.parametrize("codec", DELTA_CODECS)
def test_payload_of_another_codec_is_refused(codec: str) -> None:
    old, new = _pair()
    other = next(c for c in DELTA_CODECS if c != codec)
    with pytest.raises(SnapshotCorruptError, match="compression_format"):
        get_codec(codec).decode_patch(get_codec(other).encode(old, new), old)


@pytest.mark.parametrize("codec", list_codecs())
def test_encode_rejects_mismatched_or_unsupported_inputs(codec: str) -> None:
    old, new = _pair()
    if get_codec(codec).needs_old:
        with pytest.raises(InvalidInputError):
            get_codec(codec).encode(old, new.reshape(25, 40))
        with pytest.raises(InvalidInputError):
            get_codec(codec).encode(old, new.to(torch.float16))
    with pytest.raises(UnsupportedDtypeError):
        get_codec(codec).encode(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32))


def test_decode_does_not_modify_old_unless_in_place() -> None:
    old, new = _pair()
    before = int_bits(old).clone()
    codec = get_codec("wsdelta1")
    payload = codec.encode(old, new)
    codec.decode(payload, old)
    assert torch.equal(int_bits(old), before)
    codec.decode(payload, old, inplace=True)
    assert torch.equal(int_bits(old), int_bits(new))


def test_unknown_codec_lists_known_names() -> None:
    with pytest.raises(UnknownCodecError) as info:
        get_codec("lz-magic")
    for name in ("wsdelta1", "xor-zstd", "sparse-idx-val", "gap-zstd", "full"):
        assert name in str(info.value)
