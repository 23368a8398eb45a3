"""Compact patches: `Codec.decode_compact` returns the smaller form, bit-exactly; a dense
patch is written in place without an undo; dense codecs decompress into the patch's own
array. What a replica holds for a delta touching most elements is one copy of the tensor."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard

from _support.bit_patterns import DTYPES, random_bits, ulp_moves
from _support.bits import int_bits
from weightsync.codec import Patch, get_codec, list_codecs, wsdelta1
from weightsync.codec.base import sparse_bytes
from weightsync.codec.bits import bits
from weightsync.codec.framing import (
    TRAILER_BYTES,
    decompress_zlib_into,
    decompress_zstd_into,
    seal,
)
from weightsync.errors import InvalidInputError, SnapshotCorruptError

WRITABLE = [c for c in list_codecs() if not get_codec(c).read_only]


def _changed(old: torch.Tensor, new: torch.Tensor) -> int:
    return int((int_bits(old) != int_bits(new)).sum())


@pytest.mark.parametrize("codec", WRITABLE)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.19, 0.5, 1.0])
def test_decode_compact_is_bit_exact_in_the_smaller_form(codec: str, density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    old = random_bits(rng, torch.bfloat16, (300, 70), specials=0.02)
    new = ulp_moves(rng, old, density=density)
    before = old.clone()
    impl = get_codec(codec)
    patch = impl.decode_compact(impl.encode(old, new), old)
    dense_bytes = old.numel() * old.element_size()
    sparse_form = impl.decode_patch(impl.encode(old, new), old)
    if sparse_form.positions is None:  # a dense codec: always the tensor's new bits
        assert patch.positions is None
    elif sparse_bytes(_changed(old, new), old.element_size()) > dense_bytes:
        assert patch.positions is None, (codec, density)
    else:
        assert patch.positions is not None, (codec, density)
    assert patch.nbytes <= max(dense_bytes, sparse_form.nbytes)
    target = old.clone()
    patch.apply_(target)
    assert torch.equal(int_bits(target), int_bits(new))
    assert torch.equal(int_bits(old), int_bits(before))  # `old` was only read


@pytest.mark.parametrize("dtype", DTYPES)
def test_wsdelta1_decodes_a_dense_delta_straight_into_new_bits(dtype: torch.dtype) -> None:
    """Every element moved, specials included: the patch is the tensor's new bits."""
    rng = np.random.default_rng(3)
    old = random_bits(rng, dtype, (513, 31), specials=0.1)
    new = ulp_moves(rng, old, density=1.0, big=0.3)
    codec = get_codec(wsdelta1.NAME)
    patch = codec.decode_compact(codec.encode(old, new), old)
    assert patch.positions is None
    assert patch.nbytes == old.numel() * old.element_size()
    assert np.array_equal(patch.values, bits(new))


def test_wsdelta1_compact_decode_across_dense_sparse_and_unchanged_chunks() -> None:
    """Three chunks: random new bits (stored dense), one ulp everywhere (sparse, every
    element), untouched; plus a short tail chunk with a few changes."""
    rng = np.random.default_rng(5)
    chunk = wsdelta1.CHUNK_ELEMENTS
    n = 3 * chunk + 1000
    old = random_bits(rng, torch.bfloat16, (n,), specials=0.0)
    new = old.clone()
    new[:chunk] = random_bits(rng, torch.bfloat16, (chunk,), specials=0.0)
    new[chunk : 2 * chunk] = ulp_moves(rng, old[chunk : 2 * chunk], density=1.0)
    new[3 * chunk :] = ulp_moves(rng, old[3 * chunk :], density=0.01)
    codec = get_codec(wsdelta1.NAME)
    payload = codec.encode(old, new)
    patch = codec.decode_compact(payload, old)
    assert patch.positions is None
    assert np.array_equal(patch.values, bits(new))
    assert np.array_equal(codec.decode(payload, old).view(torch.int16), new.view(torch.int16))


def _with_chunk_count(payload: bytes, old: torch.Tensor, delta: int) -> bytes:
    """The payload with chunk 0's change count moved by `delta`, sealed again (a valid
    trailer over a lying table: only the decoder itself can notice)."""
    content = bytearray(payload[:-TRAILER_BYTES])
    header = 7 + 8 * old.dim()
    row = header + struct.calcsize("<QI")
    (m,) = struct.unpack_from("<I", content, row + 2)
    struct.pack_into("<I", content, row + 2, m + delta)
    return seal([bytes(content)])


def test_wsdelta1_compact_decode_refuses_a_stream_that_does_not_match_its_table() -> None:
    rng = np.random.default_rng(9)
    old = random_bits(rng, torch.bfloat16, (200, 50), specials=0.0)
    new = ulp_moves(rng, old, density=0.5)
    codec = get_codec(wsdelta1.NAME)
    payload = codec.encode(old, new)
    before = old.clone()
    for delta in (1, -1):
        with pytest.raises(SnapshotCorruptError, match="stream error"):
            codec.decode_compact(_with_chunk_count(payload, old, delta), old)
    assert torch.equal(int_bits(old), int_bits(before))


def test_write_without_undo_copies_a_dense_patch_and_checks_it() -> None:
    rng = np.random.default_rng(1)
    old = random_bits(rng, torch.bfloat16, (64, 8), specials=0.0)
    new = ulp_moves(rng, old, density=1.0)
    target = old.clone()
    Patch(None, bits(new).copy()).write_(target)
    assert torch.equal(int_bits(target), int_bits(new))
    with pytest.raises(ValueError, match="cannot fill"):
        Patch(None, bits(new)[:-1].copy()).write_(target)
    assert torch.equal(int_bits(target), int_bits(new))


def test_write_without_undo_refuses_positions_outside_and_changes_nothing() -> None:
    target = torch.zeros(100, dtype=torch.bfloat16)
    patch = Patch(np.array([3, 100], dtype=np.int64), np.array([1, 2], dtype=np.uint16))
    with pytest.raises(IndexError):
        patch.write_(target)
    assert not bool(target.view(torch.int16).any())
    Patch(np.array([3, 99], dtype=np.int64), np.array([1, 2], dtype=np.uint16)).write_(target)
    assert target.view(torch.int16)[[3, 99]].tolist() == [1, 2]


RAW = np.random.default_rng(0).integers(0, 8, 300_001, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("declared", [True, False], ids=["size declared", "size omitted"])
def test_zstd_into_fills_exactly_and_refuses_more_or_less(declared: bool) -> None:
    frame = zstandard.ZstdCompressor(level=3, write_content_size=declared).compress(RAW)
    out = np.empty(len(RAW), dtype=np.uint8)
    decompress_zstd_into(frame, out, what="s")
    assert out.tobytes() == RAW
    with pytest.raises(SnapshotCorruptError, match="more than 300000 bytes"):
        decompress_zstd_into(frame, np.empty(len(RAW) - 1, dtype=np.uint8), what="s")
    with pytest.raises(SnapshotCorruptError, match="expected 300002"):
        decompress_zstd_into(frame, np.empty(len(RAW) + 1, dtype=np.uint8), what="s")
    with pytest.raises(SnapshotCorruptError):
        decompress_zstd_into(frame[: len(frame) // 2], out, what="s")
    with pytest.raises(SnapshotCorruptError, match="not a"):
        decompress_zstd_into(b"not zstd at all", out, what="s")
    with pytest.raises(InvalidInputError):
        decompress_zstd_into(frame, np.empty(2 * len(RAW), dtype=np.uint8)[::2], what="s")


def test_zlib_into_fills_exactly_and_refuses_more_or_less() -> None:
    stream = zlib.compress(RAW, 6)
    out = np.empty(len(RAW), dtype=np.uint8)
    decompress_zlib_into(stream, out, what="s")
    assert out.tobytes() == RAW
    with pytest.raises(SnapshotCorruptError, match="more than 300000 bytes"):
        decompress_zlib_into(stream, np.empty(len(RAW) - 1, dtype=np.uint8), what="s")
    with pytest.raises(SnapshotCorruptError, match="expected 300002"):
        decompress_zlib_into(stream, np.empty(len(RAW) + 1, dtype=np.uint8), what="s")
    with pytest.raises(SnapshotCorruptError):
        decompress_zlib_into(stream[:-10], out, what="s")
    with pytest.raises(SnapshotCorruptError, match="after its zlib stream"):
        decompress_zlib_into(stream + b"x", out, what="s")
    with pytest.raises(SnapshotCorruptError, match="not a valid zlib"):
        decompress_zlib_into(b"not zlib at all", out, what="s")
