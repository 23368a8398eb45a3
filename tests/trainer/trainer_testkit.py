"""Helpers for trainer tests: one training step, bit-exact comparisons."""

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


def int_bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits, for bit-exact comparisons."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, tensor in a.items():
        assert tensor.dtype == b[name].dtype, name
        assert tensor.shape == b[name].shape, name
        assert torch.equal(int_bits(tensor), int_bits(b[name])), f"{name} differs"
