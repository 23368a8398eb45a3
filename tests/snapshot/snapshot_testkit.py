"""Helpers shared by snapshot tests: toy weights, deterministic perturbations."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from weightsync.toymodel import build_model


def toy_weights(dtype: torch.dtype = torch.bfloat16, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny Qwen3 model's state dict in `dtype`, tied lm_head removed (as callers do)."""
    return {name: t.to(dtype, copy=True) for name, t in _toy_fp32(seed).items()}


@functools.cache
def _toy_fp32(seed: int) -> dict[str, torch.Tensor]:
    model = build_model("tiny", seed=seed)
    return {
        name: t.detach().clone().contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }


def perturb(
    weights: Mapping[str, torch.Tensor], *, seed: int, fraction: float = 0.1
) -> dict[str, torch.Tensor]:
    """A copy of `weights` with a random `fraction` of elements nudged (an RL-like step)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(weights.items()):
        new = t.clone()
        mask = torch.rand(t.shape, generator=gen) < fraction
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.05
        new[mask] = (t.float() + noise)[mask].to(t.dtype)
        out[name] = new
    return out
