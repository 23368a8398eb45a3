"""The tiny model the server and engine tests serve, what a base snapshot of it holds, and the
snapshot tests' toy weights."""

from __future__ import annotations

import functools
from typing import Any

import torch

# A wider init than the default makes the random model's greedy output vary token to
# token, so comparisons (between engines, between snapshots) are not trivially equal.
INIT_RANGE = 0.2


def toy_model(seed: int = 0, **overrides: Any) -> Any:
    """A tiny Qwen3 model in bf16 (the dtype snapshots carry); `overrides` go to its config."""
    from weightsync.toymodel import build_model

    return build_model(
        "tiny", seed=seed, dtype=torch.bfloat16, initializer_range=INIT_RANGE, **overrides
    )


def snapshot_tensors(model: Any) -> dict[str, torch.Tensor]:
    """What a base snapshot holds: the state dict with the tied `lm_head.weight` left out."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def model_holding(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    """A plain `transformers` Qwen3 model of `config` holding exactly `weights` (the reference).

    Tied weights missing from `weights` (a snapshot leaves out `lm_head.weight`) are tied.
    """
    from transformers import AutoModelForCausalLM, Qwen3Config

    model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=torch.bfloat16)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    return model.eval()


def toy_weights(dtype: torch.dtype = torch.bfloat16, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny Qwen3 model's state dict in `dtype`, tied lm_head removed (as callers do)."""
    return {name: t.to(dtype, copy=True) for name, t in _toy_fp32(seed).items()}


@functools.cache
def _toy_fp32(seed: int) -> dict[str, torch.Tensor]:
    from weightsync.toymodel import build_model

    model = build_model("tiny", seed=seed)
    return {
        name: t.detach().clone().contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"
    }
