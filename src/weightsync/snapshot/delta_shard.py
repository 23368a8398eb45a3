"""Delta shard files: a safetensors file of 1-D uint8 tensors, one codec payload per weight.

Using safetensors for the container keeps every file of a snapshot in one
well-specified, pickle-free format; the metadata names the codec so a shard
is self-describing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save as save_numpy

from weightsync.errors import SnapshotCorruptError

DELTA_SHARD_FORMAT = "weightsync-delta"
_HEADER_LEN_BYTES = 8
# safetensors caps headers at 100 MB; anything larger is corrupt, not a big model.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def encode_delta_shard(payloads: Mapping[str, bytes], *, compression_format: str) -> bytes:
    """Bytes of one delta shard holding `payloads` (weight name -> codec payload)."""
    arrays = {name: np.frombuffer(payloads[name], dtype=np.uint8) for name in sorted(payloads)}
    metadata = {"format": DELTA_SHARD_FORMAT, "compression_format": compression_format}
    return save_numpy(arrays, metadata=metadata)


def decode_delta_shard(
    data: bytes, *, compression_format: str, where: str
) -> dict[str, memoryview]:
    """Weight name -> payload (a zero-copy view of `data`); raises SnapshotCorruptError."""
    header, start = _read_header(data, where)
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != DELTA_SHARD_FORMAT:
        raise SnapshotCorruptError(f"{where} is not a weightsync delta shard: {metadata!r}")
    if metadata.get("compression_format") != compression_format:
        raise SnapshotCorruptError(
            f"{where} is encoded with {metadata.get('compression_format')!r} but the manifest "
            f"says {compression_format!r}"
        )
    view = memoryview(data)[start:]
    payloads: dict[str, memoryview] = {}
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorruptError(f"{where}: malformed entry for {name!r}") from e
        if dtype != "U8" or shape != [end - begin] or not 0 <= begin <= end <= len(view):
            raise SnapshotCorruptError(f"{where}: entry {name!r} is not a valid uint8 payload")
        payloads[name] = view[begin:end]
    return payloads


def _read_header(data: bytes, where: str) -> tuple[dict[str, dict], int]:
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
