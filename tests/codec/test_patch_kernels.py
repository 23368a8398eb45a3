"""The compiled scatter gives the same bits as numpy's fancy indexing, and is memory-safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsync.codec import Patch, write_patches
from weightsync.codec.bits import bits
from weightsync.codec.patch_kernels import KERNEL_MIN_ELEMENTS, scatter_sorted, swap_in


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_large_patch_applies_and_undoes_bit_exactly(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 200 * KERNEL_MIN_ELEMENTS  # several slices, so the threads split the work
    old = torch.randn(n, generator=gen).to(dtype)
    new = torch.randn(n, generator=gen).to(dtype)
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(n, size=n // 2, replace=False))
    expected = bits(old).copy()
    expected[positions] = bits(new)[positions]

    target = old.clone()
    undo = Patch(positions.astype(np.int64), bits(new)[positions].copy()).apply_(target)
    assert np.array_equal(bits(target), expected)
    undo.apply_(target)
    assert np.array_equal(bits(target), bits(old))


def test_out_of_range_positions_raise_instead_of_writing_outside() -> None:
    view = np.zeros(KERNEL_MIN_ELEMENTS * 2, dtype=np.uint16)
    positions = np.arange(KERNEL_MIN_ELEMENTS + 1, dtype=np.int64)
    positions[-1] = view.size + 10
    values = np.ones(positions.size, dtype=np.uint16)
    with pytest.raises(IndexError, match="outside"):
        swap_in(view, positions, values)
    assert not view.any(), "a refused patch must leave the tensor unchanged"
    negative = positions.copy()
    negative[-1] = -1
    with pytest.raises(IndexError, match="outside"):
        swap_in(view, negative, values)
    assert not view.any()


def test_warm_up_compiles_every_width_without_touching_real_data() -> None:
    from weightsync.codec.patch_kernels import warm_up

    warm_up()  # idempotent; a replica calls it while starting
    view = np.arange(KERNEL_MIN_ELEMENTS, dtype=np.uint32)
    old = swap_in(view, np.arange(KERNEL_MIN_ELEMENTS, dtype=np.int64), view[::-1].copy())
    assert np.array_equal(old, np.arange(KERNEL_MIN_ELEMENTS, dtype=np.uint32))
    assert np.array_equal(view, np.arange(KERNEL_MIN_ELEMENTS, dtype=np.uint32)[::-1])


@pytest.mark.parametrize("size", [100, 3 * KERNEL_MIN_ELEMENTS], ids=["numpy", "compiled"])
def test_scatter_sorted_writes_like_fancy_indexing(size: int) -> None:
    start = 1000
    rng = np.random.default_rng(1)
    out = rng.integers(0, 1 << 16, 4 * size, dtype=np.uint16)
    positions = start + np.sort(rng.choice(out.size, size=size, replace=False)).astype(np.int64)
    values = rng.integers(0, 1 << 16, size, dtype=np.uint16)
    expected = out.copy()
    expected[positions - start] = values
    assert scatter_sorted(out, positions, values, start)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("size", [100, 3 * KERNEL_MIN_ELEMENTS], ids=["numpy", "compiled"])
@pytest.mark.parametrize("fault", ["repeated", "unsorted", "past the end", "before the start"])
def test_scatter_sorted_refuses_positions_a_patch_cannot_have(size: int, fault: str) -> None:
    start = 1000
    out = np.zeros(4 * size, dtype=np.uint16)
    positions = start + np.arange(0, 4 * size, 4, dtype=np.int64)
    middle = size // 2
    if fault == "repeated":
        positions[middle] = positions[middle - 1]
    elif fault == "unsorted":
        positions[middle], positions[middle + 1] = positions[middle + 1], positions[middle]
    elif fault == "past the end":
        positions[-1] = start + out.size
    else:
        positions[0] = start - 1
    assert not scatter_sorted(out, positions, np.ones(size, dtype=np.uint16), start)


Pairs = list[tuple[torch.Tensor, Patch]]


def _write_case(rng: np.random.Generator) -> tuple[Pairs, list[np.ndarray]]:
    """Tensors of every width, small and large, sparse and dense: the pairs and their
    expected bits (computed with numpy's fancy indexing)."""
    pairs, expected = [], []
    shapes = [(7,), (3, 5), (2 * KERNEL_MIN_ELEMENTS,), (300, 1000), (5 * KERNEL_MIN_ELEMENTS + 3,)]
    dtypes = [torch.bfloat16, torch.float32, torch.float8_e4m3fn]
    for i, shape in enumerate(shapes * 2):
        dtype = dtypes[i % len(dtypes)]
        target = torch.randn(shape).to(dtype)
        new = torch.randn(shape).to(dtype)
        flat_new = bits(new).reshape(-1)
        want = bits(target).reshape(-1).copy()
        if i % 4 == 3:  # dense
            patch = Patch(None, flat_new.copy())
            want[:] = flat_new
        else:
            size = want.size
            count = max(1, size // (2 + i))
            positions = np.sort(rng.choice(size, size=count, replace=False)).astype(np.int64)
            patch = Patch(positions, flat_new[positions].copy())
            want[positions] = flat_new[positions]
        pairs.append((target, patch))
        expected.append(want)
    return pairs, expected


def test_write_patches_writes_every_tensor_like_fancy_indexing() -> None:
    pairs, expected = _write_case(np.random.default_rng(2))
    write_patches(pairs)
    for (target, _), want in zip(pairs, expected, strict=True):
        assert np.array_equal(bits(target).reshape(-1), want)


@pytest.mark.parametrize("fault", ["past the end", "negative", "dense of the wrong size"])
def test_write_patches_refuses_a_patch_that_does_not_fit_before_writing_any(fault: str) -> None:
    pairs, _ = _write_case(np.random.default_rng(3))
    before = [bits(t).copy() for t, _ in pairs]
    target, patch = pairs[-1]
    assert patch.positions is not None
    positions = patch.positions.copy()
    if fault == "past the end":
        positions[-1] = target.numel()
        bad = Patch(positions, patch.values)
    elif fault == "negative":
        positions[0] = -1
        bad = Patch(positions, patch.values)
    else:
        bad = Patch(None, bits(target).reshape(-1)[:-1].copy())
    with pytest.raises(IndexError if fault != "dense of the wrong size" else ValueError):
        write_patches([*pairs[:-1], (target, bad)])
    for (t, _), old in zip(pairs, before, strict=True):
        assert np.array_equal(bits(t), old), "a refused write must change no tensor"


@pytest.mark.parametrize("fault", ["repeated", "unsorted"])
def test_write_patches_refuses_positions_out_of_order_and_stays_inside(fault: str) -> None:
    size = 4 * KERNEL_MIN_ELEMENTS
    positions = np.arange(0, size, 2, dtype=np.int64)
    middle = positions.size // 2
    if fault == "repeated":
        positions[middle] = positions[middle - 1]
    else:  # a jump far back, still inside the tensor
        positions[middle] = 1
    guard = torch.zeros(size + 64, dtype=torch.bfloat16)
    view = guard[:size]  # a write past `view` would land in the guard's tail
    with pytest.raises(ValueError, match="strictly increasing"):
        write_patches([(view, Patch(positions, np.ones(positions.size, dtype=np.uint16)))])
    assert not bool(guard[size:].view(torch.int16).any())
