"""Helpers for the engine tests: a tiny bf16 Qwen3 model, its snapshot tensors, a step guard."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from weightsync.toymodel import build_model

# A wider init than the default makes the random model's greedy output vary
# token to token, so comparisons between engines are not trivially equal.
INIT_RANGE = 0.2
PROMPT = [5, 17, 33, 8, 90, 41, 12, 77, 64, 3, 99, 21]


def reference_model(seed: int = 0) -> Any:
    """A tiny Qwen3 model built in bf16 (the dtype snapshots carry)."""
    return build_model("tiny", seed=seed, dtype=torch.bfloat16, initializer_range=INIT_RANGE)


def snapshot_tensors(model: Any) -> dict[str, torch.Tensor]:
    """What a base snapshot holds: the state dict with the tied `lm_head.weight` left out."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


class RecordingGuard:
    """A step guard that counts steps and yields a settable identity (like the replica's)."""

    def __init__(self, identity: str = "snap-a") -> None:
        self.identity = identity
        self.entered = 0
        self.held = False
        self.lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[str]:
        with self.lock:
            self.entered += 1
            self.held = True
            try:
                yield self.identity
            finally:
                self.held = False
