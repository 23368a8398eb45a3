"""Token choice under temperature / top-k / top-p, and the sampling logprob it reports."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from weightsync.server.engines.sampling import (
    new_generator,
    pick_token,
    sampling_logprob,
    token_logprobs,
)

LOGITS = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9, -3.0], dtype=torch.float32)


def _draws(n: int, **knobs: float) -> Counter[int]:
    generator = new_generator(7)
    return Counter(pick_token(LOGITS, generator=generator, **knobs) for _ in range(n))  # type: ignore[arg-type]


def test_greedy_is_argmax_and_certain() -> None:
    assert pick_token(LOGITS, temperature=0.0, top_p=1.0, generator=new_generator(0)) == 0
    assert sampling_logprob(LOGITS, 0, temperature=0.0, top_p=1.0) == 0.0


def test_top_k_draws_only_the_k_most_likely() -> None:
    seen = _draws(400, temperature=1.0, top_p=1.0, top_k=2)
    assert set(seen) == {0, 1}
    assert pick_token(LOGITS, temperature=5.0, top_p=1.0, top_k=1, generator=new_generator(1)) == 0


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    probs = torch.softmax(LOGITS, -1)
    # The two most likely carry less than 0.8 of the mass; the third (index 4) reaches it.
    assert float(probs[0] + probs[1]) < 0.8 < float(probs[0] + probs[1] + probs[4])
    assert set(_draws(600, temperature=1.0, top_p=0.8)) == {0, 1, 4}


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 3)]
)
def test_sampling_logprob_is_the_drawn_distributions(
    temperature: float, top_p: float, top_k: int
) -> None:
    """Against an independent computation of the renormalised head."""
    probs = torch.softmax(LOGITS.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        kept.append(i)
        mass += float(probs[i])
    total = sum(float(probs[i]) for i in kept)
    for token in range(len(LOGITS)):
        got = sampling_logprob(LOGITS, token, temperature=temperature, top_p=top_p, top_k=top_k)
        if token in kept:
            assert got == pytest.approx(math.log(float(probs[token]) / total), abs=1e-5)
        else:
            assert got == -math.inf
    if (temperature, top_p, top_k) == (1.0, 1.0, 0):
        # The full distribution: the sampling logprob is the model's own.
        model, _ = token_logprobs(LOGITS, 1, top_k=0)
        assert sampling_logprob(LOGITS, 1, temperature=1.0, top_p=1.0) == pytest.approx(model)
