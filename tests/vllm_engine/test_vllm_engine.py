"""The vLLM engine against the engine interface, on a real vLLM (CPU) and a tiny model.

One engine serves the whole module (vLLM takes ~15 s to start); each test puts
back the base weights it started from.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _support.bits import same_bits
from _support.vllm_reference import PROMPTS, check_against_reference, perturbed, reference_model
from weightsync.codec import DEFAULT_CHECKSUM, DEFAULT_CODEC, Patch, checksum_tensor, get_codec
from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.server.engines import get_engine
from weightsync.server.engines.base import GenerateRequest, StepGuard
from weightsync.server.engines.vllm_engine import VllmEngine
from weightsync.toymodel import build_model, save_model_dir

# A submodule: pytest puts tests/ on sys.path, where `vllm` alone resolves to this
# test directory as a namespace package.
pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(240)]


@contextmanager
def _guard_on(identity: str, calls: list[str] | None = None) -> Iterator[str]:
    if calls is not None:
        calls.append(identity)
    yield identity


def guard(identity: str, calls: list[str] | None = None) -> StepGuard:
    return lambda: _guard_on(identity, calls)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, torch.Tensor]]:
    model_dir = save_model_dir(build_model("small", seed=0), tmp_path_factory.mktemp("base"))
    config = json.loads((model_dir / "config.json").read_text())
    return config, load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def engine(base) -> Iterator[VllmEngine]:
    config, tensors = base
    eng = get_engine(
        "vllm-inprocess",
        max_model_len=256,
        max_num_seqs=4,
        kv_cache_memory_bytes=32 << 20,
        block_size=32,
    )
    assert isinstance(eng, VllmEngine)
    eng.load_base(config, tensors)
    yield eng
    eng.close()


@pytest.fixture
def fresh(engine: VllmEngine, base) -> Iterator[VllmEngine]:
    """The module's engine, put back on the base weights (and a clean cache) after the test."""
    yield engine
    config, tensors = base
    engine.load_base(config, tensors)
    engine.reset_prompt_cache("all")


def greedy(prompt: list[int], max_tokens: int = 10, logprobs: int | None = 0) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=logprobs
    )


def patches_to(engine: VllmEngine, new: dict[str, torch.Tensor], names: list[str]) -> dict:
    codec = get_codec(DEFAULT_CODEC)
    live = engine.named_weights()
    return {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in names}


def test_base_serves_like_the_reference(fresh: VllmEngine, base) -> None:
    _, tensors = base
    ref = reference_model(tensors)
    for prompt in PROMPTS:
        calls: list[str] = []
        result = fresh.generate(greedy(prompt, logprobs=2), step_guard=guard("base-1", calls))
        check_against_reference(ref, prompt, result)
        assert result.token_snapshots == ["base-1"] * len(result.token_ids)
        assert result.finish_reason == "length" and len(result.token_ids) == 10
        assert result.top_logprobs is not None and all(len(t) == 2 for t in result.top_logprobs)
        assert calls, "the step guard was never entered"
    for name, t in fresh.named_weights().items():
        assert same_bits(t, tensors[name]), name


def test_delta_is_bit_exact_served_and_undone(fresh: VllmEngine, base) -> None:
    _, tensors = base
    names = sorted(tensors)
    new = perturbed(tensors, names, seed=1)
    undo = fresh.apply_patches(patches_to(fresh, new, names))
    live = fresh.named_weights()
    assert all(same_bits(live[n], new[n]) for n in names)
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, new[n]) for n in names}
    assert fresh.weights_checksums(DEFAULT_CHECKSUM) == want
    fresh.reset_prompt_cache("all")
    ref_new = reference_model(new)
    for prompt in PROMPTS:
        check_against_reference(
            ref_new, prompt, fresh.generate(greedy(prompt), step_guard=guard("d"))
        )
    fresh.apply_patches(undo)
    fresh.reset_prompt_cache("all")
    assert all(same_bits(fresh.named_weights()[n], tensors[n]) for n in names)
    ref_old = reference_model(tensors)
    for prompt in PROMPTS:
        check_against_reference(
            ref_old, prompt, fresh.generate(greedy(prompt), step_guard=guard("b"))
        )


def test_partial_change_pushes_whole_fused_layers_and_tied_head(fresh: VllmEngine, base) -> None:
    # Only q of a fused qkv layer, only gate of gate_up, and the (tied) embedding change.
    _, tensors = base
    names = [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    ]
    new = perturbed(tensors, names, seed=2, scale=1.0)
    fresh.apply_patches(patches_to(fresh, new, names))
    fresh.reset_prompt_cache("all")
    ref = reference_model(new)
    for prompt in PROMPTS:
        check_against_reference(ref, prompt, fresh.generate(greedy(prompt), step_guard=guard("p")))


def test_prompt_cache_is_used_then_reset(fresh: VllmEngine, base) -> None:
    _, tensors = base
    prompt = PROMPTS[0]
    fresh.generate(greedy(prompt, max_tokens=2), step_guard=guard("a"))
    again = fresh.generate(greedy(prompt, max_tokens=2), step_guard=guard("a"))
    assert again.num_cached_prompt_tokens >= 32
    new = perturbed(tensors, sorted(tensors), seed=3)
    fresh.apply_patches(patches_to(fresh, new, sorted(tensors)))
    assert fresh.reset_prompt_cache("all") >= 1
    after = fresh.generate(greedy(prompt), step_guard=guard("b"))
    assert after.num_cached_prompt_tokens == 0
    check_against_reference(reference_model(new), prompt, after)


def test_concurrent_requests_batch_and_record_identity(fresh: VllmEngine, base) -> None:
    _, tensors = base
    ref = reference_model(tensors)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fresh.generate(
                greedy(PROMPTS[i], max_tokens=16), step_guard=guard(f"s{i}")
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        result = results[i]
        check_against_reference(ref, prompt, result)  # type: ignore[arg-type]
        assert set(result.token_snapshots) <= {"s0", "s1", "s2"}  # type: ignore[attr-defined]


def test_stop_tokens_and_sampling(fresh: VllmEngine) -> None:
    first = fresh.generate(greedy(PROMPTS[1], max_tokens=3), step_guard=guard("x"))
    stop = first.token_ids[1]
    stopped = fresh.generate(
        GenerateRequest(
            prompt_token_ids=PROMPTS[1], max_tokens=8, temperature=0.0, stop_token_ids=(stop,)
        ),
        step_guard=guard("x"),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]
    sample = GenerateRequest(prompt_token_ids=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7)
    a = fresh.generate(sample, step_guard=guard("x"))
    b = fresh.generate(sample, step_guard=guard("x"))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert fresh.generate(greedy([1], max_tokens=0), step_guard=guard("x")).token_ids == []


def test_bad_input_is_refused(fresh: VllmEngine) -> None:
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        fresh.generate(greedy([5, 100000]), step_guard=guard("x"))
    with pytest.raises(InvalidInputError, match="empty"):
        fresh.generate(greedy([]), step_guard=guard("x"))
    with pytest.raises(InvalidInputError, match="adapter"):
        fresh.generate(
            GenerateRequest(prompt_token_ids=[5], adapter="lora-1"), step_guard=guard("x")
        )
    with pytest.raises(UnsupportedOperationError, match="LoRA"):
        fresh.load_adapter("lora-1", {}, {})
    with pytest.raises(InvalidInputError, match="lacks"):
        fresh.apply_patches({"no.such.weight": Patch(None, np.zeros(1, dtype=np.uint16))})
