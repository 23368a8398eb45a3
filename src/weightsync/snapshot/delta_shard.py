"""Delta shard files: a safetensors file of 1-D uint8 tensors, one codec payload per weight.

Using safetensors for the container keeps every file of a snapshot in one
well-specified, pickle-free format; the metadata names the codec so a shard
is self-describing.
"""

from __future__ import annotations

from collections.abc import Mapping

from weightsync.errors import SnapshotCorruptError
from weightsync.snapshot.safetensors_file import RawTensor, encode_safetensors, read_header

DELTA_SHARD_FORMAT = "weightsync-delta"


def encode_delta_shard(payloads: Mapping[str, bytes], *, compression_format: str) -> bytes:
    """Bytes of one delta shard holding `payloads` (weight name -> codec payload)."""
    tensors = {name: RawTensor("U8", (len(p),), p) for name, p in payloads.items()}
    metadata = {"format": DELTA_SHARD_FORMAT, "compression_format": compression_format}
    return encode_safetensors(tensors, metadata)


def decode_delta_shard(
    data: bytes, *, compression_format: str, where: str
) -> dict[str, memoryview]:
    """Weight name -> payload (a zero-copy view of `data`); raises SnapshotCorruptError."""
    header, start = read_header(data, where)
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
