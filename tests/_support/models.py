"""The tiny model the server and engine tests serve, and what a base snapshot of it holds."""

from __future__ import annotations

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
