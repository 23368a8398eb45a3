"""Deterministic changes to a state dict: what one RL-like training step does to the weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def perturb(
    weights: Mapping[str, torch.Tensor], *, seed: int, fraction: float = 0.1
) -> dict[str, torch.Tensor]:
    """A copy of `weights` with a random `fraction` of elements nudged (an RL-like step).

    The other elements keep their bits; the same seed gives the same copy.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(weights.items()):
        new = t.clone()
        mask = torch.rand(t.shape, generator=gen) < fraction
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.05
        new[mask] = (t.float() + noise)[mask].to(t.dtype)
        out[name] = new
    return out
