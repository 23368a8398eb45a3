"""Bit views of tensors: codecs work on raw unsigned-integer bits, never on float values.

Working on bits is what makes every codec bit-exact for NaN payloads, ±0, ±Inf and
subnormals: no float arithmetic ever touches the data.
"""

from __future__ import annotations

import numpy as np
import torch

from weightsync.errors import UnsupportedDtypeError

# dtypes a codec accepts, by their safetensors/HF spelling.
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SUPPORTED_DTYPES.items()}

_INT_VIEW: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_UINT_NP: dict[int, type[np.unsignedinteger]] = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def dtype_name(dtype: torch.dtype) -> str:
    """Return the safetensors spelling of a supported dtype, or raise."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"dtype {dtype} is not supported; supported: {', '.join(map(str, DTYPE_NAMES))}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype name, or raise."""
    try:
        return SUPPORTED_DTYPES[name]
    except KeyError:
        raise UnsupportedDtypeError(
            f"dtype {name!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from None


def bits(t: torch.Tensor) -> np.ndarray:
    """Flat unsigned-integer numpy view (no copy) of a contiguous CPU tensor's bits."""
    dtype_name(t.dtype)
    if not t.is_contiguous():
        raise UnsupportedDtypeError("tensor must be contiguous to take a bit view")
    size = t.element_size()
    flat = t.detach().reshape(-1)
    return flat.view(_INT_VIEW[size]).numpy().view(_UINT_NP[size])


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch integer dtype of `dtype`'s width: `t.view(...)` of it shows the bits.

    On any device (the numpy view `bits` needs a CPU tensor).
    """
    return _INT_VIEW[torch.empty((), dtype=dtype).element_size()]


def uint_dtype(t: torch.Tensor) -> np.dtype:
    return np.dtype(_UINT_NP[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` have the same dtype and shape and hold the same bits.

    Compared as raw bytes (NaN payloads, ±0 told apart), on any device and dtype.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    return bool(torch.equal(_byte_view(a), _byte_view(b)))


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)
