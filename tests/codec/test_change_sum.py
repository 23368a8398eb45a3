"""Change sums (FORMAT.md §4.2): the definition pinned, and both sides agree with it.

The trainer adds the sum up from the changes `wsdelta1` finds; a replica from the
patch it is about to apply and its live bits. Both must equal the definition,
computed here in plain Python from FORMAT.md's formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _support.bit_patterns import DTYPES, random_bits
from weightsync.codec import change_sum, get_codec
from weightsync.codec.bits import bits

pytestmark = pytest.mark.timeout(120)

MASK = (1 << 64) - 1


def fmix64(x: int) -> int:
    """SplitMix64's finalizer, as FORMAT.md §4.2 writes it."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def definition(old: np.ndarray, new: np.ndarray) -> str:
    """S_k(new) - S_k(old) in both lanes, element by element (small arrays only)."""
    lanes = [0, 0]
    pairs = zip(old.reshape(-1).tolist(), new.reshape(-1).tolist(), strict=True)
    for p, (a, b) in enumerate(pairs):
        for k, key in enumerate((0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93)):
            lanes[k] += fmix64(((p << 32) | b) ^ key) - fmix64(((p << 32) | a) ^ key)
    return f"{lanes[0] & MASK:016x}{lanes[1] & MASK:016x}"


def test_the_definition_is_pinned() -> None:
    """One bf16 element 0.0 -> 1.0 at position 3: the constants and layout of FORMAT.md."""
    old = np.zeros(4, dtype=np.uint16)
    new = old.copy()
    new[3] = 0x3F80
    assert definition(old, new) == "1c5bd1191892ea568e26f33fe548345b"
    assert change_sum.tensor_change_sum(old, new) == definition(old, new)
    assert change_sum.tensor_change_sum(old, old) == "0" * 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_and_patch_sums_equal_the_definition(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    old = random_bits(rng, dtype, (37, 29), specials=0.3)
    new = random_bits(rng, dtype, (37, 29), specials=0.3)
    keep = torch.from_numpy(rng.random((37, 29)) < 0.7)
    new = torch.where(keep, old, new)
    expected = definition(bits(old), bits(new))
    encoded = get_codec("wsdelta1").encode_for_manifest(old, new)
    assert encoded.change_sum == expected
    patch = get_codec("wsdelta1").decode_patch(encoded.payload, old)
    assert patch.positions is not None
    live = bits(old).reshape(-1)
    assert change_sum.patch_change_sum(live, patch.positions, patch.values) == expected


def test_sums_across_chunks_and_slices_compose() -> None:
    """Past the encoder's chunks (2**22) and the patch slices (2**20): A->B + B->C = A->C."""
    n = (1 << 22) + 4097
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    b, c = a.copy(), a.copy()
    moved = rng.choice(n, 200_000, replace=False)
    b[moved] ^= 1
    c[moved[:100_000]] ^= 3
    c[rng.choice(n, 50_000, replace=False)] ^= 8
    codec = get_codec("wsdelta1")
    as_t = lambda x: torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)  # noqa: E731
    ab = codec.encode_for_manifest(as_t(a), as_t(b)).change_sum
    bc = codec.encode_for_manifest(as_t(b), as_t(c)).change_sum
    ac = codec.encode_for_manifest(as_t(a), as_t(c)).change_sum
    assert ab == change_sum.tensor_change_sum(a, b)
    assert ab is not None and bc is not None and ac is not None
    total = change_sum.ChangeSum(int(ab[:16], 16), int(ab[16:], 16))
    total.add((int(bc[:16], 16), int(bc[16:], 16)))
    assert total.hexdigest() == ac
    positions = np.flatnonzero(a != c)
    assert change_sum.patch_change_sum(a, positions, c[positions]) == ac


def test_any_wrong_element_of_a_patch_changes_the_sum() -> None:
    rng = np.random.default_rng(1)
    live = rng.integers(0, 1 << 16, 5000, dtype=np.uint16)
    positions = np.sort(rng.choice(5000, 300, replace=False)).astype(np.int64)
    values = rng.integers(0, 1 << 16, 300, dtype=np.uint16)
    right = change_sum.patch_change_sum(live, positions, values)
    wrong_value = values.copy()
    wrong_value[150] ^= 0x0001
    assert change_sum.patch_change_sum(live, positions, wrong_value) != right
    wrong_place = positions.copy()
    wrong_place[150] = positions[150] + 1 if positions[150] + 1 < positions[151] else -1
    if wrong_place[150] >= 0:
        assert change_sum.patch_change_sum(live, wrong_place, values) != right
    other_parent = live.copy()
    other_parent[positions[7]] ^= 0x8000
    assert change_sum.patch_change_sum(other_parent, positions, values) != right


@pytest.mark.parametrize(
    "positions",
    [[3, 3, 9], [9, 3], [-1, 4], [4, 5000]],
    ids=["repeated", "unsorted", "negative", "past-the-end"],
)
def test_a_patch_that_cannot_be_summed_is_reported(positions: list[int]) -> None:
    live = np.zeros(5000, dtype=np.uint16)
    pos = np.array(positions, dtype=np.int64)
    assert change_sum.patch_change_sum(live, pos, np.ones(pos.size, dtype=np.uint16)) is None


def test_large_positions_across_slices_are_checked_for_order() -> None:
    """A repeat exactly at a slice boundary (2**20) is still caught."""
    n = (1 << 21) + 10
    live = np.zeros(n, dtype=np.uint8)
    pos = np.arange(n, dtype=np.int64)
    pos[1 << 20] = pos[(1 << 20) - 1]
    assert change_sum.patch_change_sum(live, pos, np.ones(n, dtype=np.uint8)) is None


def test_carried_only_by_tensors_and_checksums_it_suits() -> None:
    assert change_sum.fits((1 << 32) - 1) and not change_sum.fits(1 << 32)
    assert change_sum.carried_with("xxh3_64") and not change_sum.carried_with("blake3")
