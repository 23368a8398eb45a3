"""numba kernels of `wsdelta1`: one pass over a chunk's bits, no float math.

Keys: a float's sign-magnitude bits map to an unsigned integer that orders like
the float (`-0` and `+0` adjacent), so a one-ulp move is a key difference of ±1
whatever the sign. All arithmetic is int64 on `width`-bit keys, modulo 2^width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

# A symbol is `quotient * 6 + magnitude_class * 2 + negative`, magnitude class
# 0: step ±1, 1: ±2, 2: ±3 or more (the rest in the big stream); quotients
# 0..41 fit one byte (symbols 0..251).
CLASSES = 3
ESCAPE = 255  # symbol: add ESCAPE_STEP to the gap quotient, read the next symbol
ESCAPE_STEP = 42
BIG_BASE = 3  # the big stream holds |step| - BIG_BASE
MAX_VARINT_BYTES = 5  # magnitudes are < 2^32

# Decoder status codes (0 = ok).
OK = 0
ERR_SYMBOLS = 1
ERR_POSITION = 2
ERR_LOW_BITS = 3
ERR_MAGNITUDE = 4
ERR_TRAILING = 5

F = TypeVar("F", bound=Callable[..., Any])


def _kernel(func: F) -> F:
    """Compile with numba: cached on disk (compile once per install), GIL released
    so chunks run in parallel threads."""
    return cast(F, njit(cache=True, nogil=True)(func))


@_kernel
def _key(u: Any, sign: Any, mask: Any) -> Any:
    if u & sign:
        return mask - u
    return u | sign


@_kernel
def _unkey(k: Any, sign: Any, mask: Any) -> Any:
    if k & sign:
        return k ^ sign
    return mask - k


@_kernel
def find_changes(  # noqa: PLR0917  (numba kernels take positional arguments)
    old: np.ndarray,
    new: np.ndarray,
    start: int,
    stop: int,
    origin: int,
    out: np.ndarray,
    old_out: np.ndarray,
    new_out: np.ndarray,
    m: int,
) -> int:
    """Append each position (relative to `origin`) in [start, stop) where bits differ
    to `out[m:]`, with its old and new bits to `old_out` / `new_out`; return the new
    count. Element by element: for short tails and unaligned arrays."""
    for i in range(start, stop):
        out[m] = i - origin
        old_out[m] = old[i]
        new_out[m] = new[i]
        m += old[i] != new[i]
    return m


@_kernel
def find_changes_words(  # noqa: PLR0917
    old: np.ndarray,
    new: np.ndarray,
    lane_bits: int,
    out: np.ndarray,
    old_out: np.ndarray,
    new_out: np.ndarray,
) -> int:
    """`find_changes` over 64-bit words of elements of `lane_bits` bits each; return
    the count.

    Two steps per group of 64 words. First a bit mask of the group's changed words:
    a loop with no branch and no store, which LLVM vectorizes, so the unchanged words
    (most of them) cost about their memory read. Then the mask's set bits, lowest
    first, and in each changed word its changed lanes, also lowest first (trailing
    zero counts). Most changed words hold one change, so both loops are well
    predicted; a branch per word, as before, mispredicted on many of the ~12 % of
    words that changed at 3 % and made the scan 2.5x slower (docs/benchmarks.md,
    "A ninth run"). Each change's old and new bits are written beside its position,
    while its word is in a register, so the coder and the change sum read them in
    sequence instead of gathering them again from the whole chunk.
    """
    lane_shift = 3 if lane_bits == 8 else 4 if lane_bits == 16 else 5  # no division per change
    m = 0
    groups = old.shape[0] // 64
    for g in range(groups):
        first = g * 64
        changed = np.uint64(0)
        for i in range(64):
            changed |= np.uint64(old[first + i] != new[first + i]) << np.uint64(i)
        while changed != 0:
            w = first + trailing_zeros(changed)
            changed &= changed - np.uint64(1)
            m = _changed_lanes(w, old[w], new[w], lane_shift, out, old_out, new_out, m)
    for w in range(groups * 64, old.shape[0]):
        m = _changed_lanes(w, old[w], new[w], lane_shift, out, old_out, new_out, m)
    return m


@_kernel
def _changed_lanes(  # noqa: PLR0917
    w: int,
    a: Any,
    b: Any,
    lane_shift: int,
    out: np.ndarray,
    old_out: np.ndarray,
    new_out: np.ndarray,
    m: int,
) -> int:
    """Append the changed lanes of word `w` (old `a`, new `b`; lanes of
    `1 << lane_shift` bits), lowest first."""
    lane_mask = (np.uint64(1) << np.uint64(1 << lane_shift)) - np.uint64(1)
    base = w << (6 - lane_shift)
    x = a ^ b
    while x != 0:
        lane = trailing_zeros(x) >> lane_shift
        shift = np.uint64(lane << lane_shift)
        out[m] = base + lane
        old_out[m] = (a >> shift) & lane_mask
        new_out[m] = (b >> shift) & lane_mask
        m += 1
        x &= ~(lane_mask << shift)
    return m


@_kernel
def emit_sparse(  # noqa: PLR0917  (numba kernels take positional arguments)
    old_bits: np.ndarray,
    new_bits: np.ndarray,
    positions: np.ndarray,
    m: int,
    k: int,
    width: int,
    sym: np.ndarray,
    low_words: np.ndarray,
    big: np.ndarray,
) -> tuple[int, int, int]:
    """Code `m` changes (chunk-relative `positions`, their old and new bits): joint
    symbols, raw low gap bits, varint big magnitudes.

    The low bits are packed lowest bit first into the uint64 `low_words` (at least
    `m * k // 64 + 2` of them), read as little-endian bytes they are the stream. The
    word being filled stays in a register and is stored whole after every change,
    with no branch on when it fills up: a byte-at-a-time flush loop, whose trip count
    varies from change to change, was a quarter of this kernel's time at 3 %.

    Returns the lengths used in `sym`, the low bit stream in bytes, and `big`.
    """
    sign = np.int64(1) << (width - 1)
    mask = (np.int64(1) << width) - 1
    low_mask = (np.int64(1) << k) - 1
    low_step = np.uint64(k)
    prev = np.int64(-1)
    ns = 0
    nb = 0
    word = np.uint64(0)  # low bits not yet complete in a stored word
    filled = np.uint64(0)  # how many bits of `word` are used, < 64
    nw = 0
    for j in range(m):
        p = np.int64(positions[j])
        gap = p - prev - 1
        prev = p
        q = gap >> k
        while q >= ESCAPE_STEP:
            sym[ns] = ESCAPE
            ns += 1
            q -= ESCAPE_STEP
        d = (
            _key(np.int64(new_bits[j]), sign, mask) - _key(np.int64(old_bits[j]), sign, mask)
        ) & mask
        negative = np.int64(d > sign)
        d += negative * (mask + 1 - 2 * d)  # |step|
        cls: Any = d - 1
        if d >= BIG_BASE:
            cls = CLASSES - 1
            v = d - BIG_BASE
            while v >= 0x80:
                big[nb] = (v & 0x7F) | 0x80
                nb += 1
                v >>= 7
            big[nb] = v
            nb += 1
        sym[ns] = q * (2 * CLASSES) + cls * 2 + negative
        ns += 1
        low = np.uint64(gap & low_mask)
        word |= low << filled
        low_words[nw] = word
        # The bits of `low` that did not fit (two shifts: a shift by 64 is undefined).
        rest = (low >> np.uint64(1)) >> (np.uint64(63) - filled)
        filled += low_step
        full = filled >= np.uint64(64)
        word = rest if full else word
        filled = filled - np.uint64(64) if full else filled
        nw += int(full)
    low_words[nw] = word
    return ns, (nw * 64 + int(filled) + 7) // 8, nb


@_kernel
def decode_sparse(  # noqa: PLR0917
    sym: np.ndarray,
    low: np.ndarray,
    big: np.ndarray,
    old: np.ndarray,
    start: int,
    count: int,
    m: int,
    k: int,
    width: int,
    pos_out: np.ndarray,
    val_out: np.ndarray,
    out_offset: int,
) -> int:
    """Inverse of `emit_sparse`; writes absolute positions and new bits. Returns a status."""
    return _decode_changes(
        sym, low, big, old, start, count, m, k, width, pos_out, val_out, out_offset, False
    )


@_kernel
def decode_sparse_in_place(  # noqa: PLR0917
    sym: np.ndarray,
    low: np.ndarray,
    big: np.ndarray,
    dense: np.ndarray,
    start: int,
    count: int,
    m: int,
    k: int,
    width: int,
) -> int:
    """`decode_sparse` into `dense`, a copy of the old bits: each changed element's old
    bits are read, then its new bits written over them (positions strictly increase, so
    none is read after it is written). No positions are built. Returns a status; on an
    error `dense` is partly written (the caller discards it)."""
    return _decode_changes(
        sym, low, big, dense, start, count, m, k, width,
        np.empty(0, dtype=np.int64), dense[:0], 0, True,
    )  # fmt: skip


@_kernel
def _decode_changes(  # noqa: PLR0917
    sym: np.ndarray,
    low: np.ndarray,
    big: np.ndarray,
    old: np.ndarray,
    start: int,
    count: int,
    m: int,
    k: int,
    width: int,
    pos_out: np.ndarray,
    val_out: np.ndarray,
    out_offset: int,
    in_place: bool,
) -> int:
    sign = np.int64(1) << (width - 1)
    mask = (np.int64(1) << width) - 1
    low_mask = np.uint64((np.int64(1) << k) - 1)
    prev = np.int64(-1)
    si = 0
    bi = 0
    li = 0
    acc = np.uint64(0)
    nacc = 0
    nsym = sym.shape[0]
    nbig = big.shape[0]
    nlow = low.shape[0]
    for j in range(m):
        q = np.int64(0)
        while True:
            if si >= nsym:
                return ERR_SYMBOLS
            s = np.int64(sym[si])
            si += 1
            if s == ESCAPE:
                q += ESCAPE_STEP
                continue
            break
        if s >= ESCAPE_STEP * 2 * CLASSES:
            return ERR_SYMBOLS
        q += s // (2 * CLASSES)
        cls = (s // 2) % CLASSES
        lo = np.int64(0)
        if k > 0:
            while nacc < k:
                if li >= nlow:
                    return ERR_LOW_BITS
                acc |= np.uint64(low[li]) << np.uint64(nacc)
                li += 1
                nacc += 8
            lo = np.int64(acc & low_mask)
            acc >>= np.uint64(k)
            nacc -= k
        if q > count:
            return ERR_POSITION
        p = prev + 1 + ((q << k) | lo)
        if p >= count or p <= prev:
            return ERR_POSITION
        prev = p
        d = cls + 1
        if cls == CLASSES - 1:
            v = np.int64(0)
            shift = 0
            while True:
                if bi >= nbig or shift >= 7 * MAX_VARINT_BYTES:
                    return ERR_MAGNITUDE
                b = np.int64(big[bi])
                bi += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            d = v + BIG_BASE
            if d > sign:
                return ERR_MAGNITUDE
        if s & 1:
            d = -d
        ko = _key(np.int64(old[start + p]), sign, mask)
        if in_place:
            old[start + p] = _unkey((ko + d) & mask, sign, mask)
        else:
            pos_out[out_offset + j] = start + p
            val_out[out_offset + j] = _unkey((ko + d) & mask, sign, mask)
    if si != nsym or bi != nbig or li != nlow:
        return ERR_TRAILING
    return OK
