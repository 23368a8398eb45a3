"""`wsdelta1`'s kernels against plain definitions: the word scanner against the
element-by-element one, the low-bit stream against a bit-by-bit packer."""

from __future__ import annotations

import numpy as np
import pytest

from weightsync.codec import wsdelta_kernels as kernels

WIDTHS = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _pair(
    rng: np.random.Generator, size: int, count: int, density: float
) -> tuple[np.ndarray, ...]:
    dtype = WIDTHS[size]
    old = rng.integers(0, np.iinfo(dtype).max, count, dtype=dtype, endpoint=True)
    new = old.copy()
    changed = rng.random(count) < density
    # Any bit pattern, so changes land in every lane, including the top one.
    new[changed] ^= rng.integers(
        1, np.iinfo(dtype).max, int(changed.sum()), dtype=dtype, endpoint=True
    )
    return old, new


@pytest.mark.parametrize("size", sorted(WIDTHS))
@pytest.mark.parametrize("density", [0.0, 0.01, 0.03, 0.18, 0.6, 1.0])
def test_word_scanner_finds_what_the_element_scanner_finds(size: int, density: float) -> None:
    """Lengths around the scanner's 64-word groups: none, part of one, whole ones, a tail."""
    rng = np.random.default_rng(int(density * 1000) + size)
    lanes = 8 // size
    for words in (0, 1, 63, 64, 65, 127, 128, 200, 4096 + 17):
        old, new = _pair(rng, size, words * lanes, density)
        expected = [np.empty(old.size, np.int32), np.empty_like(old), np.empty_like(old)]
        found = [np.empty(old.size, np.int32), np.empty_like(old), np.empty_like(old)]
        want = kernels.find_changes(old, new, 0, old.size, 0, *expected, 0)
        got = kernels.find_changes_words(old.view(np.uint64), new.view(np.uint64), size * 8, *found)
        assert got == want == int((old != new).sum())
        for e, f in zip(expected, found, strict=True):
            np.testing.assert_array_equal(f[:got], e[:want])


@pytest.mark.parametrize("k", [0, 1, 3, 7, 13, 21])
def test_low_bit_stream_is_each_gaps_low_bits_lowest_first(k: int) -> None:
    """The stream crosses many 64-bit word boundaries, at every offset."""
    rng = np.random.default_rng(k)
    for m in (1, 2, 63, 64, 65, 1000):
        gaps = rng.integers(0, 1 << min(k + 5, 20), m)  # positions stay int32
        positions = (np.cumsum(gaps + 1) - 1).astype(np.int32)
        old_bits = rng.integers(0, 1 << 16, m, dtype=np.uint16)
        new_bits = old_bits ^ np.uint16(1)
        sym = np.empty(m + int(positions[-1] >> k) // kernels.ESCAPE_STEP + 16, np.uint8)
        low_words = np.full(m * k // 64 + 2, 0xDEAD_BEEF, np.uint64)  # stale bits must not leak
        big = np.empty(m * kernels.MAX_VARINT_BYTES, np.uint8)
        _, nl, _ = kernels.emit_sparse(old_bits, new_bits, positions, m, k, 16, sym, low_words, big)

        stream = [(int(g) >> i) & 1 for g in gaps for i in range(k)]
        stream += [0] * (-len(stream) % 8)
        expected = bytes(
            sum(bit << i for i, bit in enumerate(stream[b : b + 8]))
            for b in range(0, len(stream), 8)
        )
        assert nl == len(expected)
        assert low_words.astype("<u8").view(np.uint8)[:nl].tobytes() == expected
