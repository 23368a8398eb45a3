"""Choosing the next token from one position's logits, and its logprobs.

Everything here works in fp32 on a 1-D logits vector, whatever dtype the model
computes in, so greedy picks and logprobs do not depend on the engine's dtype
handling. Logprobs are those of the model's own distribution (the raw logits),
independent of `temperature` and `top_p`, like vLLM's and OpenAI's.
"""

from __future__ import annotations

import math

import torch


def pick_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    top_k: int = 0,
) -> int:
    """Greedy (`temperature == 0`) or top-k / nucleus sampling from fp32 `logits` [vocab]."""
    if temperature == 0.0:
        # argmax takes the first of equal maxima, like `transformers` greedy search.
        return int(torch.argmax(logits).item())
    probs = _sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sampling_logprob(
    logits: torch.Tensor, token_id: int, *, temperature: float, top_p: float, top_k: int = 0
) -> float:
    """The logprob of `token_id` under the distribution it was drawn from (0.0 when greedy).

    This is the behaviour policy's logprob (after temperature, top-k and top-p),
    which RL needs when those change the distribution; `token_logprobs` gives the
    model's own.
    """
    if temperature == 0.0:
        return 0.0
    probs = _sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    mass = float(probs[token_id].item())
    return math.log(mass / float(probs.sum().item())) if mass > 0.0 else -math.inf


def _sampling_probs(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """Unnormalised probabilities after temperature, top-k and top-p (zero outside the head)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_k < probs.numel():
        # Keep exactly the k most likely (ties broken by torch.topk's order).
        kept = torch.zeros_like(probs)
        values, indices = torch.topk(probs, top_k)
        probs = kept.scatter_(0, indices, values)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest head whose mass reaches top_p: a token stays if the mass
        # before it is still below top_p (so the most likely token always stays).
        total = sorted_probs.sum()
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(mass_before < top_p * total, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def token_logprobs(
    logits: torch.Tensor, token_id: int, *, top_k: int
) -> tuple[float, dict[int, float] | None]:
    """The logprob of `token_id` under fp32 `logits`, and the `top_k` most likely (k > 0)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = float(logprobs[token_id].item())
    if top_k <= 0:
        return chosen, None
    values, indices = torch.topk(logprobs, min(top_k, logprobs.numel()))
    return chosen, {
        int(i): float(v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
    }


def new_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded for reproducible sampling, else from OS entropy."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        # Any int is a valid seed; fold it into the generator's 64-bit seed space.
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
