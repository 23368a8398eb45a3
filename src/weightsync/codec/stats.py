"""Change statistics of an update: how many elements moved, by how many key steps, and
the information bound a delta codec is measured against.

The bound `n·H(p) + m·H(Δ)` bits (n elements, m changed, p = m/n, H(Δ) the
empirical entropy of the key steps of the changed elements) is what any codec
that codes *which* elements changed, independently, and *by how much*, from
the empirical distribution, must spend; `wsdelta1` is judged by its ratio to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from weightsync.codec.bits import bits
from weightsync.errors import InvalidInputError

# Histogram buckets of |key step|, as (label, low, high) inclusive.
STEP_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-4", 3, 4),
    ("5-16", 5, 16),
    ("17-256", 17, 256),
    (">256", 257, 2**63 - 1),
)


@dataclass(frozen=True, kw_only=True)
class ChangeStats:
    """What changed between two tensors (or two same-named tensor sets)."""

    num_elements: int
    num_changed: int
    changed_fraction: float
    #: Fraction of the changed elements that moved by exactly one key step (±1 ulp).
    one_step_fraction: float
    #: Empirical entropy of the signed key steps, bits per changed element.
    step_entropy_bits: float
    #: n·H(p): bits to say which elements changed.
    position_bits: float
    #: n·H(p) + m·H(Δ): the information bound of the update, in bits.
    bound_bits: float
    #: Fraction of changes per |key step| bucket (labels of `STEP_BUCKETS`).
    step_histogram: dict[str, float] = field(default_factory=dict)

    @property
    def bound_bytes(self) -> float:
        return self.bound_bits / 8

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def order_keys(u: np.ndarray) -> np.ndarray:
    """int64 keys ordering like the floats whose sign-magnitude bits are `u` (unsigned)."""
    width = u.dtype.itemsize * 8
    sign = np.int64(1) << (width - 1)
    mask = (np.int64(1) << width) - 1
    wide = u.astype(np.int64)
    return np.where(wide & sign, mask - wide, wide | sign)


def key_steps(old_bits: np.ndarray, new_bits: np.ndarray) -> np.ndarray:
    """Signed key steps (modulo 2^width, in (-2^(w-1), 2^(w-1)]) of the elements that differ."""
    changed = old_bits != new_bits
    width = old_bits.dtype.itemsize * 8
    sign = np.int64(1) << (width - 1)
    mask = (np.int64(1) << width) - 1
    d = (order_keys(new_bits[changed]) - order_keys(old_bits[changed])) & mask
    return np.where(d > sign, d - (mask + 1), d)


def _binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _pairs(
    old: torch.Tensor | Mapping[str, torch.Tensor], new: torch.Tensor | Mapping[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        pairs = [(old, new)]
    elif isinstance(old, Mapping) and isinstance(new, Mapping):
        if set(old) != set(new):
            missing = sorted(set(old) ^ set(new))[:5]
            raise InvalidInputError(f"tensor sets differ in names, e.g. {missing}")
        pairs = [(old[name], new[name]) for name in old]
    else:
        raise InvalidInputError("change_stats takes two tensors or two name->tensor mappings")
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            raise InvalidInputError(
                f"cannot compare {tuple(a.shape)} {a.dtype} with {tuple(b.shape)} {b.dtype}"
            )
    return pairs


def change_stats(
    old: torch.Tensor | Mapping[str, torch.Tensor], new: torch.Tensor | Mapping[str, torch.Tensor]
) -> ChangeStats:
    """Statistics of the update `old -> new` (two tensors, or two same-named tensor sets).

    Works on bit views only, so NaN payloads and ±0 count as values like any other.
    """
    steps: list[np.ndarray] = []
    num_elements = 0
    for a, b in _pairs(old, new):
        num_elements += a.numel()
        steps.append(key_steps(bits(a.contiguous()), bits(b.contiguous())))
    all_steps = np.concatenate(steps) if steps else np.empty(0, dtype=np.int64)
    m = int(all_steps.size)
    p = m / num_elements if num_elements else 0.0
    step_entropy = 0.0
    histogram: dict[str, float] = {label: 0.0 for label, _, _ in STEP_BUCKETS}
    one_step = 0.0
    if m:
        _, counts = np.unique(all_steps, return_counts=True)
        probs = counts / m
        step_entropy = float(-(probs * np.log2(probs)).sum())
        magnitude = np.abs(all_steps)
        for label, low, high in STEP_BUCKETS:
            histogram[label] = float(((magnitude >= low) & (magnitude <= high)).sum() / m)
        one_step = histogram["1"]
    position_bits = num_elements * _binary_entropy(p)
    return ChangeStats(
        num_elements=num_elements,
        num_changed=m,
        changed_fraction=p,
        one_step_fraction=one_step,
        step_entropy_bits=step_entropy,
        position_bits=position_bits,
        bound_bits=position_bits + m * step_entropy,
        step_histogram=histogram,
    )
