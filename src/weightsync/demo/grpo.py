"""A minimal GRPO update: group-normalised advantages on sampled completions.

The demo samples each prompt `group_size` times from the deployment, scores the
completions, and takes one on-policy policy-gradient step on the trainer's fp32
master weights. It also measures how far the trainer's log-probabilities of the
sampled tokens are from the ones the deployment reported: a deployment serving
stale weights shows up there at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class RolloutGroup:
    """Completions of one prompt, with their rewards and the deployment's logprobs."""

    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]
    rewards: list[float]
    sampled_logprobs: list[list[float]]


@dataclass(frozen=True, kw_only=True)
class GrpoStats:
    loss: float
    mean_reward: float
    #: Mean |trainer logprob - deployment logprob| over sampled tokens (bf16 noise only).
    logprob_gap: float
    num_tokens: int


def group_advantages(rewards: Sequence[float], eps: float = 1e-4) -> list[float]:
    """Rewards normalised within their group (zero when every reward is equal)."""
    mean = sum(rewards) / len(rewards)
    var = sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1)
    std = math.sqrt(var)
    return [(r - mean) / (std + eps) for r in rewards]


def grpo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[RolloutGroup],
    *,
    max_grad_norm: float = 1.0,
) -> GrpoStats:
    """One optimizer step of the GRPO objective over `groups`; returns its statistics."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_tokens = sum(len(c) for g in groups for c in g.completion_token_ids)
    loss_sum = 0.0
    gap_sum = 0.0
    gap_count = 0
    for group in groups:
        # One padded forward per group: all completions share the prompt.
        kept = [i for i, c in enumerate(group.completion_token_ids) if c]
        if not kept:
            continue
        advantages = torch.tensor(group_advantages(group.rewards))[kept]
        completions = [group.completion_token_ids[i] for i in kept]
        prompt_len = len(group.prompt_token_ids)
        width = max(len(c) for c in completions)
        ids = torch.zeros((len(kept), prompt_len + width), dtype=torch.long)
        mask = torch.zeros((len(kept), width))
        for row, completion in enumerate(completions):
            ids[row, :prompt_len] = torch.tensor(group.prompt_token_ids)
            ids[row, prompt_len : prompt_len + len(completion)] = torch.tensor(completion)
            mask[row, : len(completion)] = 1.0
        # Padding sits after each completion, so causal attention never lets it
        # influence the scored tokens; the mask drops its own terms.
        logits = model(ids).logits[:, prompt_len - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        taken = logprobs.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)
        # Per-token average over the whole batch, like GRPO's token-level loss.
        loss = -(advantages[:, None] * taken * mask).sum() / max(1, total_tokens)
        loss.backward()  # type: ignore[no-untyped-call]
        loss_sum += float(loss.detach())
        for row, i in enumerate(kept):
            reported = group.sampled_logprobs[i][: len(completions[row])]
            if reported:
                got = taken[row, : len(reported)].detach()
                gap_sum += float((got - torch.tensor(reported)).abs().sum())
                gap_count += len(reported)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    model.eval()
    rewards = [r for g in groups for r in g.rewards]
    return GrpoStats(
        loss=loss_sum,
        mean_reward=sum(rewards) / max(1, len(rewards)),
        logprob_gap=gap_sum / max(1, gap_count),
        num_tokens=total_tokens,
    )
