"""Helpers for trainer tests: one training step (bit equality: `_support.bits`)."""

from __future__ import annotations

from typing import Any

import torch


def train_step(model: Any, optimizer: torch.optim.Optimizer, *, seed: int) -> float:
    """One AdamW step on a fixed random batch; returns the loss before the step."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
