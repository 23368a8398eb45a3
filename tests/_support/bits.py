"""Bit-for-bit comparison of tensors, written independently of the library's own bit views."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a tensor's bits (NaN payloads and ±0 told apart)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, the same bits."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(int_bits(a), int_bits(b))


def assert_bits_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Both hold the same names, and each tensor is bit-identical (dtype and shape too)."""
    assert sorted(a) == sorted(b)
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype, name
        assert tuple(tensor.shape) == tuple(b[name].shape), name
        assert torch.equal(int_bits(tensor), int_bits(b[name])), f"{name} differs"
