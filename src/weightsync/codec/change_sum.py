"""Change sums: a tensor checksum that both sides update from the changed elements alone.

The sum of a tensor `T` is, in each of two 64-bit lanes `k`,

    S_k(T) = sum over positions p of  fmix64(((p << 32) | T[p]) ^ KEY[k])   (mod 2**64)

where `T[p]` is the element's raw bits (zero-extended, at most 32 bits) and
`fmix64` is SplitMix64's finalizer (a bijection of 64-bit words). A delta's
*change sum* is `S_k(new) - S_k(old)` in both lanes: only the elements whose
bits differ contribute, so the trainer computes it from the changes it encodes
and a replica from the patch it is about to apply (positions, new bits, and its
live bits at those positions) — neither reads an unchanged element.

What equality proves (FORMAT.md §4.2): if the replica's live tensor is the
parent's (its last load ended with every live tensor's full checksum matching),
the patched tensor has the same sum as the trainer's new tensor. A different
tensor collides in a lane only by chance (about 2**-64 per lane for errors that
are not crafted); the sum is keyed by public constants, so it is no defence
against an adversary, which is why snapshots checksummed with `blake3` do not
carry it. It is a check before the swap; the full checksums of the live weights
after the swap stay the proof of bit-exactness.

Positions must fit 32 bits: a tensor of 2**32 elements or more has no change sum.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numba import njit

#: The two lanes' keys (fixed: part of the format).
KEY_1 = 0x9E3779B97F4A7C15
KEY_2 = 0xD6E8FEB86659FD93
# Numpy scalars, which the kernels compile in as constants.
_K1, _K2 = np.uint64(KEY_1), np.uint64(KEY_2)
#: Tensors with this many elements or more have no change sum (positions are 32-bit).
MAX_ELEMENTS = 1 << 32
#: Checksum formats whose snapshots carry no change sums (chosen against adversaries).
CRYPTOGRAPHIC_CHECKSUMS = frozenset({"blake3"})
#: Patch elements summed per kernel call (the lanes are carried between calls in Python).
_SLICE = 1 << 20
#: Threads summing the slices of one large patch.
_THREADS = max(1, min(2, os.cpu_count() or 1))
_MASK = (1 << 64) - 1


@njit(inline="always", cache=True)  # type: ignore[untyped-decorator]
def _fmix(x: np.uint64) -> np.uint64:
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


@njit(inline="always", cache=True)  # type: ignore[untyped-decorator]
def _change(p: Any, old_bits: Any, new_bits: Any) -> tuple[np.uint64, np.uint64]:
    """Both lanes' change when position `p` goes from `old_bits` to `new_bits`."""
    at = np.uint64(p) << np.uint64(32)
    a = at | np.uint64(old_bits)
    b = at | np.uint64(new_bits)
    return _fmix(b ^ _K1) - _fmix(a ^ _K1), _fmix(b ^ _K2) - _fmix(a ^ _K2)


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _chunk_sum(
    start: int, rel: np.ndarray, old_bits: np.ndarray, new_bits: np.ndarray, m: int
) -> tuple[np.uint64, np.uint64]:
    """Both lanes' change over `m` changes: position `start + rel[j]` goes from
    `old_bits[j]` to `new_bits[j]`."""
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for j in range(m):
        d1, d2 = _change(start + np.int64(rel[j]), old_bits[j], new_bits[j])
        s1 += d1
        s2 += d2
    return s1, s2


@njit(nogil=True, cache=True)  # type: ignore[untyped-decorator]
def _patch_sum(
    live: np.ndarray, positions: np.ndarray, values: np.ndarray, lo: int, hi: int
) -> tuple[bool, np.uint64, np.uint64]:
    """Both lanes' change of writing `values[lo:hi]` at `positions[lo:hi]` of `live`.

    False (stopped) at the first position not above the one before it (from `lo - 1`)
    or outside `live`: a patch with a repeated position would not sum to what it writes.
    """
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    prev = positions[lo - 1] if lo > 0 else np.int64(-1)
    size = live.size
    for i in range(lo, hi):
        p = positions[i]
        if p <= prev or p >= size:
            return False, s1, s2
        prev = p
        d1, d2 = _change(p, live[p], values[i])
        s1 += d1
        s2 += d2
    return True, s1, s2


class ChangeSum:
    """A change sum being added up (lanes mod 2**64); `hexdigest` is the manifest's spelling."""

    def __init__(self, lane_1: int = 0, lane_2: int = 0) -> None:
        self.lane_1 = lane_1 & _MASK
        self.lane_2 = lane_2 & _MASK

    def add(self, lanes: Iterable[int | np.uint64]) -> None:
        l1, l2 = (int(x) for x in lanes)
        self.lane_1 = (self.lane_1 + l1) & _MASK
        self.lane_2 = (self.lane_2 + l2) & _MASK

    def hexdigest(self) -> str:
        """32 lowercase hex digits: lane 1, then lane 2, each big-endian."""
        return f"{self.lane_1:016x}{self.lane_2:016x}"


def fits(num_elements: int) -> bool:
    """Whether a tensor of `num_elements` can have a change sum (32-bit positions)."""
    return num_elements < MAX_ELEMENTS


def carried_with(checksum_format: str) -> bool:
    """Whether a snapshot checksummed with `checksum_format` carries change sums."""
    return checksum_format not in CRYPTOGRAPHIC_CHECKSUMS


def chunk_change(
    start: int, rel: np.ndarray, old_bits: np.ndarray, new_bits: np.ndarray, m: int
) -> tuple[int, int]:
    """The lanes' change of `m` elements: position `start + rel[j]` of a flat bit array
    goes from `old_bits[j]` to `new_bits[j]` (they differ).

    For an encoder that has just found, in a chunk, where and how two arrays differ.
    """
    s1, s2 = _chunk_sum(start, rel, old_bits, new_bits, m)
    return int(s1), int(s2)


def patch_change_sum(live: np.ndarray, positions: np.ndarray, values: np.ndarray) -> str | None:
    """The change sum of writing `values` at `positions` of the flat bit array `live`.

    None when the positions are not strictly increasing inside `live` (such a patch
    cannot be checked this way; the caller refuses or verifies it whole). `live` is
    only read. A patch of more than `_SLICE` changes is summed in slices over
    `_THREADS` threads (the kernel releases the GIL): a replica checks several
    tensors at once, but an embedding's patch alone can outlast all the others.
    """
    positions = positions.astype(np.int64, copy=False)
    bounds = [(lo, min(lo + _SLICE, positions.size)) for lo in range(0, positions.size, _SLICE)]

    def part(bound: tuple[int, int]) -> tuple[bool, np.uint64, np.uint64]:
        return _patch_sum(live, positions, values, bound[0], bound[1])  # type: ignore[no-any-return]

    parts = map(part, bounds) if len(bounds) <= 1 else _pool().map(part, bounds)
    total = ChangeSum()
    for ok, s1, s2 in parts:
        if not ok:
            return None
        total.add((s1, s2))
    return total.hexdigest()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL  # noqa: PLW0603  (one process-wide pool, created on first use)
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="change-sum")
        return _POOL


def tensor_change_sum(old: np.ndarray, new: np.ndarray) -> str:
    """The change sum between two bit arrays of one shape (row-major), by a full comparison.

    The reference definition (tests, and tools that hold no patch); encoders use
    `chunk_change` on the changes they find.
    """
    old, new = old.reshape(-1), new.reshape(-1)
    rel = np.flatnonzero(old != new)
    total = ChangeSum()
    total.add(chunk_change(0, rel, old[rel], new[rel], rel.size))
    return total.hexdigest()


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels for every bit width."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        a = np.zeros(4, dtype=dtype)
        b = np.ones(4, dtype=dtype)
        patch_change_sum(a, np.arange(4, dtype=np.int64), b)
        chunk_change(0, np.arange(4, dtype=np.int32), a, b, 4)
        chunk_change(0, np.arange(4, dtype=np.int64), a, b, 4)
