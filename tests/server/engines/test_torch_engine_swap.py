"""Weights changing under a running generation: patches continue it, a new architecture stops it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from _support.engine_steps import PROMPT
from _support.models import snapshot_tensors, toy_model
from weightsync.codec import get_codec
from weightsync.errors import DeploymentError
from weightsync.server.engines.base import GenerateRequest, GenerateResult
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.toymodel import model_config


def _generate_with_swap_before_step(
    engine: TorchEngine, prompt: list[int], step: int, swap: Callable[[], None]
) -> GenerateResult:
    """Generate greedily in a thread; before step `step`, pause it (as the replica's swap
    lock does) and run `swap` on this thread; the guard then names the new snapshot."""
    paused, resumed = threading.Event(), threading.Event()
    steps = 0

    @contextmanager
    def guard() -> Iterator[str]:
        nonlocal steps
        steps += 1
        if steps == step:
            paused.set()
            assert resumed.wait(timeout=30)
        yield "new" if steps >= step else "old"

    outcome: dict[str, Any] = {}

    def work() -> None:
        request = GenerateRequest(prompt_token_ids=prompt, max_tokens=6, temperature=0.0)
        try:
            outcome["result"] = engine.generate(request, step_guard=guard)
        except DeploymentError as e:
            outcome["error"] = e

    worker = threading.Thread(target=work)
    worker.start()
    assert paused.wait(timeout=30)
    try:
        swap()
    finally:
        resumed.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    result: GenerateResult = outcome["result"]
    return result


def _new_weights(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        n: (t.float() + 0.1 * torch.randn(t.shape, generator=generator)).to(t.dtype)
        for n, t in old.items()
    }


@pytest.mark.timeout(60)
def test_patches_between_steps_continue_the_sequence_on_the_new_weights(model: Any) -> None:
    prompt = PROMPT[:4]  # one prefill chunk, so a plain transformers loop is the reference
    old = snapshot_tensors(model)
    new = _new_weights(old)
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model.config.to_dict(), old)
    codec = get_codec("full")

    def swap() -> None:
        live = engine.named_weights()
        engine.apply_patches(
            {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in new}
        )
        engine.reset_prompt_cache("all")

    result = _generate_with_swap_before_step(engine, prompt, step=3, swap=swap)
    assert result.token_snapshots == ["old", "old", "new", "new", "new", "new"]

    # Reference: two steps on the old weights, then the same KV continues on the new ones.
    reference = toy_model()
    cache = DynamicCache(config=reference.config)
    tokens: list[int] = []
    with torch.inference_mode():
        step_input = torch.tensor([prompt])
        for i in range(6):
            if i == 2:
                reference.load_state_dict(new, strict=False)
            logits = reference(input_ids=step_input, past_key_values=cache, use_cache=True).logits
            tokens.append(int(torch.argmax(logits[0, -1].float())))
            step_input = torch.tensor([[tokens[-1]]])
    assert result.token_ids == tokens

    unswapped = TorchEngine(cache_block_tokens=4)
    unswapped.load_base(model.config.to_dict(), old)
    request = GenerateRequest(prompt_token_ids=prompt, max_tokens=6, temperature=0.0)
    assert unswapped.generate(request, step_guard=_plain_guard).token_ids != result.token_ids


@pytest.mark.timeout(60)
def test_a_new_architecture_mid_generation_stops_it_loudly(model: Any) -> None:
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    config = model_config("tiny", num_hidden_layers=1)
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

    def swap() -> None:
        engine.load_base(config.to_dict(), snapshot_tensors(other))

    with pytest.raises(DeploymentError, match="send the request again"):
        _generate_with_swap_before_step(engine, PROMPT, step=2, swap=swap)
    assert len(engine.named_weights()) == len(snapshot_tensors(other))


@contextmanager
def _plain_guard() -> Iterator[str]:
    yield "old"
