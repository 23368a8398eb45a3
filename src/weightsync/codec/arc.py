"""`arc_v1` / `arc_v2`: Fireworks' delta codecs, byte-exact with fireworks-delta-compression.

A payload is the XOR of the old and new tensor bytes, compressed; nothing else
(fireworks-delta-compression 0.1.0, `backends/arc2.py`):

- `arc_v1`: `zlib.compress(xor)` — zlib level 6 (`Z_DEFAULT_COMPRESSION`), wbits 15;
- `arc_v2`: `zstd.compress(xor)` of the `zstd` package — zstd level 3 in zstd's
  multithreaded mode (that package sets one worker or more). Multithreaded frames
  differ from single-threaded ones once the input spans more than one job (tens
  of MB), and are the same whatever the number of workers, so weightsync
  compresses with `threads=-1` (one worker per core) and gets the same bytes.

The payload names no shape and carries no checksum: a same-size tensor of another
shape decodes "fine", and a flipped bit in a zstd block can go unnoticed. What
proves the result is the shard's metadata, `str(zlib.adler32(new bytes))` per
tensor (`shard_layout = "fireworks"`; FORMAT.md §8), checked after decoding.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
import zstandard

from weightsync.codec.base import Codec, Encoded, Patch
from weightsync.codec.bits import bits
from weightsync.codec.framing import check_pair, decompress_zlib_into, decompress_zstd_into
from weightsync.codec.registry import register_codec
from weightsync.errors import SnapshotCorruptError

ARC_V1 = "arc_v1"
ARC_V2 = "arc_v2"
#: zlib.compress's default level (what fireworks-delta-compression calls).
ZLIB_LEVEL = 6
#: zstd.compress's default level.
ZSTD_LEVEL = 3
#: Multithreaded mode, one worker per core: the frames the `zstd` package writes.
_ZSTD_THREADS = -1


def xor_bytes(old: torch.Tensor, new: torch.Tensor) -> memoryview:
    """The raw XOR of two same-shaped contiguous CPU tensors' bytes (b"" when empty)."""
    xor: np.ndarray = np.bitwise_xor(bits(old), bits(new))
    view: memoryview = xor.view(np.uint8).data
    return view


def fireworks_checksum(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """`str(zlib.adler32(data))`: the per-tensor checksum Fireworks' shards carry (decimal)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).data
    return str(zlib.adler32(data))


class _ArcXor(Codec):
    """XOR of the raw bytes, compressed by one of Fireworks' frame formats."""

    needs_old = True
    shard_layout = "fireworks"
    compressor: ClassVar[str]

    def encode(self, old: torch.Tensor, new: torch.Tensor) -> bytes:
        old, new = check_pair(old, new)
        return self._compress(xor_bytes(old, new))

    def encode_for_manifest(
        self, old: torch.Tensor, new: torch.Tensor, *, with_change_sum: bool = True
    ) -> Encoded:
        """The payload, and the nonzero elements of the XOR it compresses (one pass less)."""
        old, new = check_pair(old, new)
        xor = xor_bytes(old, new)
        changed = int(np.count_nonzero(np.frombuffer(xor, dtype=bits(old).dtype)))
        return Encoded(self._compress(xor), changed)

    def decode_patch(self, payload: bytes | memoryview, old: torch.Tensor) -> Patch:
        old_bits = bits(old.contiguous())
        what = (
            f"{self.name} payload (a {tuple(old.shape)} {old.dtype} tensor of "
            f"{old_bits.nbytes} bytes)"
        )
        # The XOR stream lands in the patch's own array (one tensor of memory).
        new_bits = np.empty_like(old_bits)
        try:
            self._decompress_into(payload, new_bits, what)
        except SnapshotCorruptError as e:
            raise SnapshotCorruptError(
                f"{e} — if the payload is not {self.compressor}, check the snapshot's "
                "compression_format"
            ) from e
        return Patch(None, np.bitwise_xor(new_bits, old_bits, out=new_bits))

    @abstractmethod
    def _compress(self, data: memoryview) -> bytes:
        """The frame of `data`, byte-exact with fireworks-delta-compression."""

    @abstractmethod
    def _decompress_into(self, payload: bytes | memoryview, out: np.ndarray, what: str) -> None:
        """Fill `out` exactly, never producing more; else `SnapshotCorruptError`."""


@register_codec
class ArcV1Codec(_ArcXor):
    name = ARC_V1
    compressor = "zlib"
    description = "Fireworks arc_v1: zlib of old XOR new bytes; dense, adler32 in the shard"

    def _compress(self, data: memoryview) -> bytes:
        return zlib.compress(data, ZLIB_LEVEL)

    def _decompress_into(self, payload: bytes | memoryview, out: np.ndarray, what: str) -> None:
        decompress_zlib_into(payload, out, what=what)


@register_codec
class ArcV2Codec(_ArcXor):
    name = ARC_V2
    compressor = "zstd"
    description = "Fireworks arc_v2: zstd of old XOR new bytes; dense, adler32 in the shard"

    def _compress(self, data: memoryview) -> bytes:
        return zstd_compress(data)

    def _decompress_into(self, payload: bytes | memoryview, out: np.ndarray, what: str) -> None:
        decompress_zstd_into(payload, out, what=what)


def zstd_compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """`zstd.compress(data, level)` of the `zstd` package, byte for byte."""
    return zstandard.ZstdCompressor(level=level, threads=_ZSTD_THREADS).compress(data)
