"""Helpers of the snapshot tests: toy weights (their perturbation: `_support.weights`)."""

from __future__ import annotations

import functools

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
