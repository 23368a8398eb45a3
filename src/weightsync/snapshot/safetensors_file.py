"""A byte-deterministic safetensors writer, and the readers weightsync needs (the header;
every tensor as a view of the file's bytes, with no copy).

The `safetensors` library writes metadata from a hash map, so two runs can order
its keys differently; snapshots are pinned byte for byte (FORMAT.md), so weightsync
writes the container itself: header JSON without spaces, `__metadata__` first
with sorted keys, then tensors sorted by name, each as `dtype`, `shape`,
`data_offsets`; the header is padded with spaces to a multiple of 8 bytes; data
follows in the same tensor order. Any safetensors reader loads the result.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from weightsync.codec.bits import SUPPORTED_DTYPES, bits, dtype_name
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
    names = sorted(tensors)
    head, _ = encode_header(
        {n: (tensors[n].dtype, tensors[n].shape, _nbytes(tensors[n].data)) for n in names},
        metadata,
    )
    # One join: the only copy of the tensor bytes made here.
    return b"".join([head, *(tensors[n].data for n in names)])


def encode_header(
    layout: Mapping[str, tuple[str, Sequence[int], int]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors file's bytes before its data, for tensors laid out in `layout`'s order
    (name -> dtype, shape, byte size), and each tensor's (begin, end) in the file.

    The length prefix and the JSON header, padded so the data starts 8-byte aligned.
    """
    header: dict[str, Any] = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, (dtype, shape, size) in layout.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        spans[name] = (offset, offset + size)
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % _ALIGN_BYTES)
    start = _HEADER_LEN_BYTES + len(text)
    head = len(text).to_bytes(_HEADER_LEN_BYTES, "little") + text
    return head, {n: (start + b, start + e) for n, (b, e) in spans.items()}


def _nbytes(data: bytes | memoryview) -> int:
    return data.nbytes if isinstance(data, (np.ndarray, memoryview)) else len(data)


def read_header(data: bytes | mmap.mmap, where: str) -> tuple[dict[str, Any], int]:
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


@dataclass(frozen=True)
class TensorView:
    """One tensor of a safetensors file as it lies there: dtype, shape and its bytes.

    `data` is a view of the file's bytes (no copy): read only when they are `bytes`
    (or a read-only map of the file).
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def tensor_views(data: bytes | mmap.mmap, where: str) -> dict[str, TensorView]:
    """Every tensor of a safetensors file as a view of `data`, its entry and bounds checked.

    Each entry must have a string dtype, a shape of non-negative integers and data
    offsets inside the data section; for a dtype weightsync knows, the byte length
    must be what the shape holds. Raises `SnapshotCorruptError` naming `where`.
    """
    header, start = read_header(data, where)
    header.pop("__metadata__", None)
    body = memoryview(data)[start:]
    views: dict[str, TensorView] = {}
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError) as e:
            raise SnapshotCorruptError(f"{where}: malformed entry for {name!r}") from e
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
        ):
            raise SnapshotCorruptError(f"{where}: malformed entry for {name!r}")
        begin, end = offsets
        if not begin <= end <= len(body):
            raise SnapshotCorruptError(
                f"{where}: tensor {name!r} lies at bytes {begin}..{end}, beyond the file's "
                f"{len(body)} data bytes"
            )
        itemsize = _ITEMSIZES.get(dtype)
        numel = math.prod(shape)
        if itemsize is not None and end - begin != numel * itemsize:
            raise SnapshotCorruptError(
                f"{where}: tensor {name!r} is {shape} {dtype} ({numel * itemsize} bytes) but "
                f"holds {end - begin} bytes"
            )
        views[name] = TensorView(dtype, tuple(shape), body[begin:end])
    return views


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_ITEMSIZES = {
    name: torch.empty((), dtype=dtype).element_size() for name, dtype in SUPPORTED_DTYPES.items()
}
