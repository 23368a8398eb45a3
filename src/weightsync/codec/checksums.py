"""Per-tensor and per-file checksums, registered by name.

Default `xxh3_64`: non-cryptographic but ~10+ GB/s on one core, so checking every
tensor of a replica after each load costs little next to the load itself.
`adler32` (also accepted as `alder32`, the spelling of the reference API) and
`crc32c` are offered for interoperability; `blake3` when a cryptographic hash is
wanted (e.g. untrusted storage).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import blake3 as blake3_lib
import crc32c as crc32c_lib
import numpy as np
import torch
import xxhash

from weightsync.codec.bits import bits
from weightsync.errors import UnknownChecksumError

DEFAULT_CHECKSUM = "xxh3_64"

Buffer = bytes | bytearray | memoryview


def _xxh3_64(data: Buffer) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _adler32(data: Buffer) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _crc32c(data: Buffer) -> str:
    return f"{crc32c_lib.crc32c(data) & 0xFFFFFFFF:08x}"


def _blake3(data: Buffer) -> str:
    return blake3_lib.blake3(data, max_threads=blake3_lib.blake3.AUTO).hexdigest()


_CHECKSUMS: dict[str, Callable[[Buffer], str]] = {
    "xxh3_64": _xxh3_64,
    "adler32": _adler32,
    "crc32c": _crc32c,
    "blake3": _blake3,
}
_ALIASES = {"alder32": "adler32"}


def canonical_checksum_name(name: str) -> str:
    """Return the registered spelling of a checksum name (aliases resolved), or raise."""
    resolved = _ALIASES.get(name, name)
    if resolved not in _CHECKSUMS:
        raise UnknownChecksumError(
            f"unknown checksum format {name!r}; known: {', '.join(list_checksums())}"
        )
    return resolved


def list_checksums() -> list[str]:
    return sorted(_CHECKSUMS)


def checksum_bytes(name: str, data: Buffer | np.ndarray) -> str:
    """Hex checksum of a byte buffer."""
    return _CHECKSUMS[canonical_checksum_name(name)](_as_buffer(data))


def checksum_tensor(name: str, tensor: torch.Tensor) -> str:
    """Hex checksum of a tensor's raw little-endian bits (contiguous CPU tensor)."""
    return checksum_bytes(name, bits(tensor.contiguous()).view(np.uint8))


class Hasher(Protocol):
    """An incremental checksum: `update` over consecutive pieces, then `hexdigest`."""

    def update(self, data: Buffer) -> object: ...

    def hexdigest(self) -> str: ...


class _Running32:
    """adler32 / crc32c: a running 32-bit value carried from piece to piece."""

    def __init__(self, step: Callable[[Buffer, int], int], start: int) -> None:
        self._step = step
        self._value = start

    def update(self, data: Buffer) -> None:
        self._value = self._step(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


def checksum_hasher(name: str) -> Hasher:
    """A hasher whose digest over consecutive pieces equals `checksum_bytes` of the whole.

    Lets a caller checksum data it never holds in one buffer (e.g. a tensor with a
    patch applied, chunk by chunk).
    """
    resolved = canonical_checksum_name(name)
    if resolved == "xxh3_64":
        return xxhash.xxh3_64()
    if resolved == "adler32":
        return _Running32(zlib.adler32, 1)
    if resolved == "crc32c":
        return _Running32(crc32c_lib.crc32c, 0)
    return blake3_lib.blake3(max_threads=blake3_lib.blake3.AUTO)


def _as_buffer(data: Buffer | np.ndarray) -> Buffer:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).data
    return data
