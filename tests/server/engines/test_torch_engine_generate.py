"""TorchEngine.generate: greedy parity with transformers, logprobs, sampling, stops, guards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from _support.engine_steps import PROMPT, RecordingGuard
from _support.models import snapshot_tensors
from weightsync.errors import InvalidInputError
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.toymodel import build_model


def _greedy(prompt: list[int], max_tokens: int, **kwargs: Any) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, **kwargs
    )


def test_greedy_equals_transformers_generate(engine: TorchEngine, model: Any) -> None:
    for prompt in (PROMPT, PROMPT[:3], [7]):
        result = engine.generate(_greedy(prompt, 10), step_guard=RecordingGuard())
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
        assert result.token_ids == expected
        assert result.finish_reason == "length"
    assert len(set(result.token_ids)) > 2  # the toy model does not just repeat a token


def test_logprobs_match_a_full_forward_pass(engine: TorchEngine, model: Any) -> None:
    result = engine.generate(_greedy(PROMPT, 6, logprobs=3), step_guard=RecordingGuard())
    assert result.logprobs is not None and result.top_logprobs is not None
    assert len(result.logprobs) == len(result.top_logprobs) == 6
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT + result.token_ids])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(result.token_ids):
        row = reference[len(PROMPT) - 1 + i]
        assert result.logprobs[i] == pytest.approx(row[token].item(), abs=2e-2)
        top = result.top_logprobs[i]
        assert len(top) == 3
        # Greedy picks a top token (bf16 logits can tie: then any of the tied ones).
        assert top[token] == max(top.values())
        for alt, logprob in top.items():
            assert logprob == pytest.approx(row[alt].item(), abs=2e-2)
    # Probabilities, not garbage: the top-3 mass is at most 1.
    assert sum(math.exp(v) for v in result.top_logprobs[0].values()) <= 1.0 + 1e-5


def test_logprobs_equal_transformers_generate_scores_exactly(
    engine: TorchEngine, model: Any
) -> None:
    result = engine.generate(_greedy(PROMPT, 6, logprobs=0), step_guard=RecordingGuard())
    out = model.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = [
        torch.log_softmax(step_logits[0].float(), dim=-1)[token].item()
        for step_logits, token in zip(out.logits, result.token_ids, strict=True)
    ]
    assert result.logprobs == expected  # same fp32 math on the same bf16 logits


def test_fp32_logprobs_match_a_full_forward_pass_tightly() -> None:
    model32 = build_model("tiny", seed=2, dtype=torch.float32, initializer_range=0.2)
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model32.config.to_dict(), snapshot_tensors(model32))
    assert engine.named_weights()["model.norm.weight"].dtype == torch.float32
    result = engine.generate(_greedy(PROMPT, 6, logprobs=2), step_guard=RecordingGuard())
    assert result.logprobs is not None
    with torch.inference_mode():
        logits = model32(torch.tensor([PROMPT + result.token_ids])).logits[0]
    reference = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(result.token_ids):
        assert result.logprobs[i] == pytest.approx(
            reference[len(PROMPT) - 1 + i, token].item(), abs=1e-4
        )


def test_logprobs_zero_gives_the_chosen_token_only(engine: TorchEngine) -> None:
    result = engine.generate(_greedy(PROMPT, 3, logprobs=0), step_guard=RecordingGuard())
    assert result.logprobs is not None and len(result.logprobs) == 3
    assert all(v <= 0.0 for v in result.logprobs)
    assert result.top_logprobs is None
    plain = engine.generate(_greedy(PROMPT, 3), step_guard=RecordingGuard())
    assert plain.logprobs is None and plain.token_ids == result.token_ids


def test_sampling_is_reproducible_with_a_seed(engine: TorchEngine) -> None:
    def sample(seed: int | None, top_p: float = 1.0) -> list[int]:
        request = GenerateRequest(
            prompt_token_ids=PROMPT, max_tokens=12, temperature=1.5, top_p=top_p, seed=seed
        )
        return engine.generate(request, step_guard=RecordingGuard()).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(5, top_p=0.9) == sample(5, top_p=0.9)
    unseeded = {tuple(sample(None)) for _ in range(3)}
    assert len(unseeded) > 1


def test_tiny_top_p_is_greedy(engine: TorchEngine) -> None:
    greedy = engine.generate(_greedy(PROMPT, 8), step_guard=RecordingGuard()).token_ids
    request = GenerateRequest(
        prompt_token_ids=PROMPT, max_tokens=8, temperature=1.0, top_p=1e-6, seed=3
    )
    assert engine.generate(request, step_guard=RecordingGuard()).token_ids == greedy


def test_stop_token_ends_generation(engine: TorchEngine) -> None:
    full = engine.generate(_greedy(PROMPT, 8), step_guard=RecordingGuard()).token_ids
    stop = full[3]
    first = full.index(stop)
    result = engine.generate(
        _greedy(PROMPT, 8, stop_token_ids=(stop,)), step_guard=RecordingGuard()
    )
    assert result.token_ids == full[: first + 1]  # the stop token is the last output token
    assert result.finish_reason == "stop"


def test_eos_from_the_config_ends_generation(model: Any) -> None:
    full_engine = TorchEngine()
    full_engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    full = full_engine.generate(_greedy(PROMPT, 8), step_guard=RecordingGuard()).token_ids
    config = model.config.to_dict() | {"eos_token_id": [full[2], 127]}
    engine = TorchEngine()
    engine.load_base(config, snapshot_tensors(model))
    result = engine.generate(_greedy(PROMPT, 8), step_guard=RecordingGuard())
    assert result.token_ids == full[: full.index(full[2]) + 1]
    assert result.finish_reason == "stop"


def test_zero_max_tokens_generates_nothing(engine: TorchEngine) -> None:
    guard = RecordingGuard()
    result = engine.generate(_greedy(PROMPT, 0), step_guard=guard)
    assert result.token_ids == [] and result.finish_reason == "length"
    assert guard.entered == 0


def test_step_guard_is_held_around_every_step_and_names_each_token(engine: TorchEngine) -> None:
    guard = RecordingGuard()
    loaded = engine._require_loaded()
    calls: list[bool] = []
    handle = loaded.model.register_forward_pre_hook(lambda *_: calls.append(guard.held))
    try:
        result = engine.generate(_greedy(PROMPT, 5), step_guard=guard)
    finally:
        handle.remove()
    # Block size 4, 12 prompt tokens: the prefill is 3 chunks but one step; then 4 decode steps.
    assert guard.entered == 5
    assert calls == [True] * 7
    assert result.token_snapshots == ["snap-a"] * 5


def test_identity_switch_mid_generation_is_recorded_per_token(engine: TorchEngine) -> None:
    identities = iter(["a", "a", "b", "b", "c"])

    @contextmanager
    def guard() -> Iterator[str]:
        yield next(identities)

    result = engine.generate(_greedy(PROMPT, 5), step_guard=guard)
    assert result.token_snapshots == ["a", "a", "b", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_token_ids=[]), "prompt is empty"),
        (dict(prompt_token_ids=[1, 128]), r"outside the vocabulary \[0, 128\)"),
        (dict(prompt_token_ids=[1], max_tokens=-1), "max_tokens"),
        (dict(prompt_token_ids=[1], temperature=-0.5), "temperature"),
        (dict(prompt_token_ids=[1], top_p=0.0), "top_p"),
        (dict(prompt_token_ids=[1], logprobs=-1), "logprobs"),
        (dict(prompt_token_ids=[1], adapter="nope"), "unknown LoRA adapter 'nope'"),
        (dict(prompt_token_ids=[1] * 2048), "fewer than 2048"),
    ],
)
def test_invalid_requests_are_refused(
    engine: TorchEngine, kwargs: dict[str, Any], message: str
) -> None:
    guard = RecordingGuard()
    with pytest.raises(InvalidInputError, match=message):
        engine.generate(GenerateRequest(**kwargs), step_guard=guard)
    assert guard.entered == 0
