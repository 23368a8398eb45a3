"""RL-like weight updates: bf16 snapshots of a toy model trained by AdamW steps.

Real RL fine-tuning takes tiny optimizer steps (lr 1e-6..1e-5) on fp32 master
weights; the bf16 weights a sampler receives change only where the master value
crosses a bf16 rounding boundary, so 1-7 % of elements change per step and most
of those move by exactly one unit in the last place. Codecs and benchmarks need
that pattern, not random noise, to be measured honestly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from weightsync.errors import InvalidInputError
from weightsync.snapshot.tied_weights import tied_duplicates

# A scaled-down Qwen3-0.6B (Qwen3's 151936-token vocabulary, hidden 512, 12
# layers): ~116M bf16 elements after tying, so a snapshot is a 100M+ element
# tensor set while an AdamW step still fits in a few GB and seconds on 2 cores.
BENCH_MODEL_OVERRIDES: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
)


def build_bench_model(*, seed: int = 0) -> Any:
    """The benchmark model: `toymodel`'s "0.6b" shape scaled down to ~116M elements."""
    from weightsync.toymodel import build_model

    return build_model("0.6b", seed=seed, **BENCH_MODEL_OVERRIDES)


def sampler_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """bf16 copies of `model`'s weights as a sampler would receive them.

    Tied duplicates are dropped as a snapshot drops them (`tied_duplicates`: the
    first name in state-dict order wins).
    """
    state = model.state_dict()
    tied = tied_duplicates(state.items(), what=f"benchmark model {type(model).__name__}")
    return {
        name: tensor.detach().to(torch.bfloat16, copy=True).contiguous()
        for name, tensor in state.items()
        if name not in tied
    }


def rl_snapshots(
    model: torch.nn.Module,
    *,
    lr: float,
    num_steps: int,
    seed: int = 0,
    batch: int = 4,
    seq_len: int = 64,
    group_size: int = 4,
    weight_decay: float = 0.01,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the bf16 sampler weights before and after each of `num_steps` AdamW steps.

    `model` must be a causal LM with fp32 master weights (e.g. from
    `weightsync.toymodel.build_model`); it is trained in place. The first item is
    the initial weights, then one item per optimizer step, so `num_steps + 1`
    items in all; each is a fresh dict of new contiguous bf16 tensors (tied
    duplicates removed, see `sampler_state_dict`).

    Each step is a GRPO-style policy-gradient step: `batch` random prompts of
    `seq_len` tokens, one token sampled from the model's own next-token
    distribution at every position (one teacher-forced forward pass, not
    autoregressive decoding — the gradient pattern is what matters here),
    advantages drawn per sequence and normalised within groups of `group_size`,
    loss `-(advantage * log p(sampled token)).mean()`. Deterministic for a given
    `seed` and model. On the benchmark model (`build_bench_model`) with AdamW
    (betas 0.9/0.999) the first steps change ~4 % / ~10 % / ~25 % of the bf16
    elements at lr 1e-6 / 3e-6 / 1e-5, falling to ~2.4 % / ~6 % / ~15 % by the
    third step as Adam's second moment settles; 80-89 % of the changes are one
    unit in the last place.
    """
    if num_steps < 0:
        raise InvalidInputError(f"num_steps must be >= 0, got {num_steps}")
    if lr <= 0:
        raise InvalidInputError(f"lr must be > 0, got {lr}")
    if batch % group_size != 0:
        raise InvalidInputError(f"batch ({batch}) must be a multiple of group_size ({group_size})")
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):
        raise InvalidInputError(
            "rl_snapshots needs fp32 master weights; build the model with dtype=torch.float32"
        )
    config: Any = model.config
    vocab_size = int(config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    try:
        yield sampler_state_dict(model)
        for _ in range(num_steps):
            _policy_gradient_step(
                model,
                optimizer,
                generator,
                vocab_size=vocab_size,
                batch=batch,
                seq_len=seq_len,
                group_size=group_size,
            )
            yield sampler_state_dict(model)
    finally:
        model.train(was_training)


def _policy_gradient_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    *,
    vocab_size: int,
    batch: int,
    seq_len: int,
    group_size: int,
) -> None:
    prompts = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    logits = model(input_ids=prompts).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        sampled = torch.multinomial(
            log_probs.exp().reshape(-1, vocab_size), 1, generator=generator
        ).reshape(batch, seq_len)
        rewards = torch.randn(batch // group_size, group_size, generator=generator)
        advantages = (rewards - rewards.mean(dim=1, keepdim=True)) / (
            rewards.std(dim=1, keepdim=True) + 1e-6
        )
        advantages = advantages.reshape(batch, 1)
    token_log_probs = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    loss = -(advantages * token_log_probs).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
