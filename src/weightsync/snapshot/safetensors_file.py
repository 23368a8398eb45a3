"""A byte-deterministic safetensors writer, and the header reader weightsync needs.

The `safetensors` library writes metadata from a hash map, so two runs can order
its keys differently; snapshots are pinned byte for byte (FORMAT.md), so weightsync
writes the container itself: header JSON without spaces, `__metadata__` first
with sorted keys, then tensors sorted by name, each as `dtype`, `shape`,
`data_offsets`; the header is padded with spaces to a multiple of 8 bytes; data
follows in the same tensor order. Any safetensors reader loads the result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from weightsync.codec.bits import bits, dtype_name
from weightsync.errors import SnapshotCorruptError

_HEADER_LEN_BYTES = 8
_ALIGN_BYTES = 8
# safetensors caps headers at 100 MB; a larger length is corruption, not a big model.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class RawTensor:
    """One tensor to write: its safetensors dtype, shape and raw little-endian bytes."""

    dtype: str
    shape: Sequence[int]
    data: bytes | memoryview


def raw_tensor(t: torch.Tensor) -> RawTensor:
    """The raw bits of a contiguous CPU tensor of a supported dtype."""
    return RawTensor(dtype_name(t.dtype), tuple(t.shape), bits(t).view(np.uint8).data)


def encode_safetensors(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> bytes:
    """Bytes of a safetensors file, byte-deterministic (see the module docstring)."""
    header: dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    chunks: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.data.nbytes if isinstance(t.data, (np.ndarray, memoryview)) else len(t.data)
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        chunks.append(t.data)
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % _ALIGN_BYTES)
    # One join: the only copy of the tensor bytes made here.
    return b"".join([len(text).to_bytes(_HEADER_LEN_BYTES, "little"), text, *chunks])


def read_header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The parsed header of a safetensors file and the offset where its data starts."""
    if len(data) < _HEADER_LEN_BYTES:
        raise SnapshotCorruptError(f"{where} is too short to be a safetensors file")
    size = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    start = _HEADER_LEN_BYTES + size
    if size > _MAX_HEADER_BYTES or start > len(data):
        raise SnapshotCorruptError(f"{where} has a header length of {size}, beyond the file")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES:start])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotCorruptError(f"{where} has a malformed safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise SnapshotCorruptError(f"{where} has a malformed safetensors header")
    return header, start
