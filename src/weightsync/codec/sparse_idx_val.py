"""`sparse-idx-val`: changed indices and their new values, raw (the PULSE/TRL style).

Body: `index_bytes(1) count(8)`, then `count` little-endian indices (int32, or
int64 for tensors of 2^31 elements or more), then `count` new values. No
entropy coding: a baseline for what sparsity alone buys.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from weightsync.codec.base import Codec, Patch
from weightsync.codec.bits import bits
from weightsync.codec.framing import check_pair, corrupt, open_payload, pack_header, seal
from weightsync.codec.registry import register_codec

NAME = "sparse-idx-val"
MAGIC = b"WSSI"
_COUNT = struct.Struct("<BQ")


def index_dtype(num_elements: int) -> np.dtype:
    return np.dtype("<i4") if num_elements < 2**31 else np.dtype("<i8")


@register_codec
class SparseIdxValCodec(Codec):
    name = NAME
    description = "int32/int64 indices + raw new values of changed elements (PULSE/TRL style)"

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        old, new = check_pair(old, new)
        old_bits, new_bits = bits(old), bits(new)
        positions = np.flatnonzero(old_bits != new_bits)
        idx = index_dtype(old_bits.size)
        return seal(
            [
                pack_header(MAGIC, new),
                _COUNT.pack(idx.itemsize, positions.size),
                positions.astype(idx).data,
                new_bits[positions].data,
            ]
        )

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        body = open_payload(payload, MAGIC, old, NAME)
        old_bits = bits(old.contiguous())
        if len(body) < _COUNT.size:
            raise corrupt(NAME, "missing count")
        index_bytes, count = _COUNT.unpack_from(body)
        idx = index_dtype(old_bits.size)
        if index_bytes != idx.itemsize or count > old_bits.size:
            raise corrupt(NAME, f"{count} changes with {index_bytes}-byte indices")
        end = _COUNT.size + count * idx.itemsize
        if len(body) != end + count * old_bits.itemsize:
            raise corrupt(NAME, f"{len(body)} body bytes for {count} changes")
        positions = np.frombuffer(body[_COUNT.size : end], dtype=idx).astype(np.int64)
        values = np.frombuffer(body[end:], dtype=old_bits.dtype).copy()
        check_positions(positions, old_bits.size, NAME)
        return Patch(positions, values)


def check_positions(positions: np.ndarray, num_elements: int, codec: str) -> None:
    """Positions must be strictly increasing and inside the tensor."""
    if positions.size and (
        positions[0] < 0 or positions[-1] >= num_elements or np.any(np.diff(positions) <= 0)
    ):
        raise corrupt(codec, "positions are not strictly increasing inside the tensor")
