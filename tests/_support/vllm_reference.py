"""Shared helpers for the vLLM engine tests: a tie-robust reference check via transformers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from weightsync.server.engines import get_engine
from weightsync.server.engines.base import GenerateResult
from weightsync.server.engines.vllm_server_engine import VllmServerEngine
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir

#: The toy size vLLM's CPU attention accepts (head size a multiple of 32).
MODEL_SIZE = "small"
#: |vLLM logprob - reference logprob| allowed: vLLM computes in bf16 with its own
#: kernels, the reference in fp32 from the same bf16 weights. Measured <= 0.006 on
#: this model; serving stale or partly updated weights moves logprobs by > 0.1.
LOGPROB_TOL = 0.03
#: The same for streams of ~1000 tokens: bf16 drift grows with the context (0.0325
#: measured at token 854 of a 900-token stream); still half of what stale weights move.
LONG_STREAM_LOGPROB_TOL = 0.05

PROMPTS: list[list[int]] = [
    list(range(5, 45)),  # longer than one KV block (32 tokens): exercises the prefix cache
    [40, 41, 42],
    [70, 3, 90, 17, 17, 60, 61, 62, 63, 64] * 4,
]


#: A small model's base: its config, its bf16 tensors and its Hugging Face directory.
Base = tuple[dict[str, Any], dict[str, torch.Tensor], Path]


def small_base(root: Path) -> Base:
    """The toy `small` model (seed 0) written under `root`, with a tokenizer."""
    tok = build_tokenizer(root / "tok")
    model_dir = save_model_dir(build_model(MODEL_SIZE, seed=0), root / "base", tokenizer_dir=tok)
    config = json.loads((model_dir / "config.json").read_text())
    return config, load_file(str(model_dir / "model.safetensors")), model_dir


@contextmanager
def serving(base: Base, **options: Any) -> Iterator[VllmServerEngine]:
    """The `vllm` engine (vLLM's server + sidecar) serving `base` as "base-0", closed after;
    `options` go to the engine on top of the tests' small-server defaults."""
    config, tensors, model_dir = base
    defaults: dict[str, Any] = {
        "max_model_len": 512,
        "max_num_seqs": 4,
        "kv_cache_memory_bytes": 32 << 20,
        "block_size": 32,
        "served_model_name": MODEL_SIZE,
        "startup_timeout_s": 360.0,
    }
    engine = get_engine("vllm", **{**defaults, **options})
    assert isinstance(engine, VllmServerEngine)
    try:
        with engine.swap("base-0"):
            engine.load_base(config, tensors, tokenizer_dir=model_dir)
        yield engine
    finally:
        engine.close()


def reference_model(weights: Mapping[str, torch.Tensor]) -> Any:
    """A transformers model (fp32 compute) holding exactly these bf16 weights."""
    model = build_model(MODEL_SIZE, seed=0)
    state = {name: t.float() for name, t in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    model.tie_weights()
    return model.eval()


def perturbed(
    tensors: Mapping[str, torch.Tensor],
    names: list[str] | None = None,
    *,
    seed: int,
    scale: float = 0.5,
) -> dict[str, torch.Tensor]:
    """A copy with `names` (default: all) moved by noise of `scale` x each tensor's spread."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in list(tensors) if names is None else names:
        t = tensors[name].float()
        noise = torch.randn(t.shape, generator=gen) * (t.std() + 1e-3) * scale
        out[name] = (t + noise).to(tensors[name].dtype)
    return out


def check_against_reference(
    model: Any, prompt: list[int], result: GenerateResult, *, tol: float = LOGPROB_TOL
) -> None:
    """Teacher-force vLLM's greedy tokens through the reference and compare.

    Every token vLLM chose must be the reference's argmax up to `tol` (a near
    tie may go either way in bf16), and every logprob must match within `tol`.
    """
    assert result.logprobs is not None
    assert len(result.token_ids) == len(result.logprobs) > 0
    ids = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    for i, (token, got) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        row = logprobs[len(prompt) - 1 + i]
        want = float(row[token])
        best = float(row.max())
        assert best - want <= tol, (
            f"step {i}: vLLM chose {token} ({want:.4f}) but the reference prefers "
            f"{int(row.argmax())} ({best:.4f})"
        )
        assert abs(got - want) <= tol, f"step {i}: logprob {got:.4f} vs reference {want:.4f}"
