"""Tensors built from raw bit patterns, for the bit-exact codec tests (see `_support.bits`)."""

from __future__ import annotations

import numpy as np
import torch

from _support.bits import int_bits

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)
_INT = {1: (np.uint8, torch.uint8), 2: (np.uint16, torch.int16), 4: (np.uint32, torch.int32)}

# ±0, ±Inf (where the format has it), NaNs with payloads, all-ones, subnormals.
SPECIALS: dict[torch.dtype, tuple[int, ...]] = {
    torch.bfloat16: (0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x0001, 0x807F),
    torch.float16: (0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF, 0x0001, 0x83FF),
    torch.float32: (
        0,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFFFFFFF,
        0x00000001,
        0x807FFFFF,
    ),
    torch.float8_e4m3fn: (0x00, 0x80, 0x7F, 0xFF, 0x01, 0x81, 0x07),
    torch.float8_e5m2: (0x00, 0x80, 0x7C, 0xFC, 0x7E, 0x7D, 0xFF, 0x01, 0x83),
}


def tensor_from_bits(
    values: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    width = torch.empty(0, dtype=dtype).element_size()
    np_dtype, torch_int = _INT[width]
    arr = np.ascontiguousarray(values.astype(np_dtype).reshape(shape))
    signed = arr.view({1: np.uint8, 2: np.int16, 4: np.int32}[width])
    return torch.from_numpy(signed).view(torch_int).view(dtype)


def random_bits(
    rng: np.random.Generator, dtype: torch.dtype, shape: tuple[int, ...], *, specials: float
) -> torch.Tensor:
    """Uniformly random bit patterns with a fraction `specials` replaced by special values."""
    width = torch.empty(0, dtype=dtype).element_size()
    n = int(np.prod(shape)) if shape else 1
    values = rng.integers(0, 2 ** (8 * width), size=n, dtype=np.uint64)
    mask = rng.random(n) < specials
    values[mask] = rng.choice(np.array(SPECIALS[dtype], dtype=np.uint64), size=int(mask.sum()))
    return tensor_from_bits(values, dtype, shape)


def ulp_moves(
    rng: np.random.Generator, old: torch.Tensor, *, density: float, big: float = 0.1
) -> torch.Tensor:
    """`old` with a fraction `density` of elements moved ±1 in their bits (a fraction
    `big` of those by up to ±40 instead): the pattern of an RL optimizer step."""
    width = old.element_size()
    np_dtype = _INT[width][0]
    bits = int_bits(old).numpy().view(np_dtype).astype(np.int64).reshape(-1)
    n = bits.size
    moved = rng.random(n) < density
    step = np.where(rng.random(n) < 0.5, -1, 1)
    step = np.where(rng.random(n) < big, step * rng.integers(2, 41, size=n), step)
    new_bits = np.where(moved, bits + step, bits) % (2 ** (8 * width))
    return tensor_from_bits(new_bits, old.dtype, tuple(old.shape))
