"""`write_on_device` with read-only values: a base's patches are views of its fetched bytes
(`FetchedSnapshot.tensor_bits`), which torch does not wrap; they are written in bounded
copies, bit-exact, in place, without torch's non-writable-array warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from _support.bits import int_bits
from weightsync.codec import Patch
from weightsync.codec.bits import bits
from weightsync.server.engines.torch_device import write_on_device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_read_only_dense_values_are_written_in_place_chunk_by_chunk(
    dtype: torch.dtype, chunk_bytes: int
) -> None:
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(37, 11, generator=gen).to(dtype)
    new = torch.randn(37, 11, generator=gen).to(dtype)
    fetched = bits(new).tobytes()  # immutable, like a fetched file
    values = np.frombuffer(fetched, dtype=bits(new).dtype)
    assert not values.flags.writeable
    target = old.clone()
    address = target.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a non-writable array
        write_on_device(Patch(None, values), target, chunk_bytes=chunk_bytes)
    assert target.data_ptr() == address
    assert torch.equal(int_bits(target), int_bits(new))
    assert bits(new).tobytes() == fetched  # the source is untouched


def test_read_only_sparse_values_are_written() -> None:
    old = torch.arange(20, dtype=torch.float32)
    positions = np.array([1, 7, 19], dtype=np.int64)
    replaced = np.array([-1.5, 2.25, 1e9], dtype=np.float32).view(np.uint32)
    values = np.frombuffer(replaced.tobytes(), dtype=np.uint32)
    target = old.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_on_device(Patch(positions, values), target)
    expected = old.clone()
    expected[[1, 7, 19]] = torch.tensor([-1.5, 2.25, 1e9])
    assert torch.equal(int_bits(target), int_bits(expected))
