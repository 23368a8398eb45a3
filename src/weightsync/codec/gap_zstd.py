"""`gap-zstd`: gap-coded changed positions + new values, each zstd-compressed (slime style).

Body: `count(8) gaps_bytes(8)`, zstd(gaps as little-endian uint32, or uint64
for tensors of 2^32 elements or more), zstd(new values). The gap before the
first change is its position; each later gap is the distance to the previous one.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import zstandard

from weightsync.codec.base import Codec, Patch
from weightsync.codec.bits import bits
from weightsync.codec.framing import (
    check_pair,
    corrupt,
    decompress_zstd_capped,
    open_payload,
    pack_header,
    seal,
)
from weightsync.codec.registry import register_codec
from weightsync.codec.sparse_idx_val import check_positions

NAME = "gap-zstd"
MAGIC = b"WSGZ"
ZSTD_LEVEL = 3
_COUNTS = struct.Struct("<QQ")


def _gap_dtype(num_elements: int) -> np.dtype:
    return np.dtype("<u4") if num_elements < 2**32 else np.dtype("<u8")


@register_codec
class GapZstdCodec(Codec):
    name = NAME
    description = "gap-coded positions + new values, zstd (slime style)"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        old, new = check_pair(old, new)
        old_bits, new_bits = bits(old), bits(new)
        positions = np.flatnonzero(old_bits != new_bits)
        gaps = np.diff(positions, prepend=0).astype(_gap_dtype(old_bits.size))
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        gap_stream = compressor.compress(gaps.data)
        value_stream = compressor.compress(new_bits[positions].data)
        return seal(
            [
                pack_header(MAGIC, new),
                _COUNTS.pack(positions.size, len(gap_stream)),
                gap_stream,
                value_stream,
            ]
        )

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        body = open_payload(payload, MAGIC, old, NAME)
        old_bits = bits(old.contiguous())
        if len(body) < _COUNTS.size:
            raise corrupt(NAME, "missing counts")
        count, gaps_bytes = _COUNTS.unpack_from(body)
        if count > old_bits.size or _COUNTS.size + gaps_bytes > len(body):
            raise corrupt(NAME, f"{count} changes, {gaps_bytes} gap bytes")
        gap_dtype = _gap_dtype(old_bits.size)
        split = _COUNTS.size + gaps_bytes
        # Both streams are bounded by the change count, itself bounded by the tensor.
        gaps = decompress_zstd_capped(
            body[_COUNTS.size : split],
            count * gap_dtype.itemsize,
            what=f"{NAME} gap stream of {count} changes",
            exact=True,
        )
        values = decompress_zstd_capped(
            body[split:],
            count * old_bits.itemsize,
            what=f"{NAME} value stream of {count} changes",
            exact=True,
        )
        positions = np.cumsum(np.frombuffer(gaps, dtype=gap_dtype), dtype=np.int64)
        check_positions(positions, old_bits.size, NAME)
        return Patch(positions, np.frombuffer(values, dtype=old_bits.dtype).copy())
