"""The `vllm` engine with tensor parallelism: two CPU workers, each patching its own slice.

`/collective_rpc` reaches every worker; each reloads the same push file and its weight
loaders copy only its slice. The sidecar reads back only what every worker holds whole
(replicated norms; the vocabulary-sharded embedding is not), and a tensor whose
workers disagree fails the comparison.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from _support.vllm_reference import (
    PROMPTS,
    Base,
    check_against_reference,
    perturbed,
    reference_model,
    serving,
    small_base,
)
from weightsync.codec import DEFAULT_CHECKSUM, DEFAULT_CODEC, checksum_tensor, get_codec
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.vllm_server_engine import VllmServerEngine, _agreed

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(400),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two workers need two CPUs"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return small_base(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def engine(base: Base) -> Iterator[VllmServerEngine]:
    # vLLM's CPU workers cannot place two ranks' threads on one NUMA node by themselves.
    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        with serving(base, serve_args=["--tensor-parallel-size", "2"]) as eng:
            yield eng
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = before


def served_like(engine: VllmServerEngine, weights: dict[str, torch.Tensor]) -> None:
    ref = reference_model(weights)
    for prompt in PROMPTS:
        result = engine.generate(
            GenerateRequest(prompt_token_ids=prompt, max_tokens=8, temperature=0.0, logprobs=1),
            step_guard=lambda: nullcontext("unused"),
        )
        check_against_reference(ref, prompt, result)
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, t) for n, t in weights.items()}
    assert engine.weights_checksums(DEFAULT_CHECKSUM) == want


def moved_norms(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`perturbed`, with the norms (all ones, so `perturbed` leaves them) moved too."""
    out = perturbed(tensors, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            out[name] = (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
    return out


def test_two_workers_serve_a_base_and_deltas_like_the_reference(
    engine: VllmServerEngine, base: Any
) -> None:
    _, tensors, _ = base
    server = engine._require_server()
    assert len(engine._rpc(server, "weightsync_model_info")) == 2  # one answer per worker
    # Only tensors every worker holds whole are read back: the norms, not the embedding.
    assert "model.embed_tokens.weight" not in server.readable
    assert "model.norm.weight" in server.readable
    served_like(engine, tensors)
    codec = get_codec(DEFAULT_CODEC)
    current = tensors
    for k in (1, 2):
        new = moved_norms(current, seed=k)
        live = engine.named_weights()
        patches = {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in new}
        with engine.swap(f"delta-{k}"):
            engine.apply_patches(patches, keep_undo=False)
            engine.reset_prompt_cache("all")
        norms = sorted(n for n in server.readable if n.endswith("norm.weight"))
        per_worker = engine._rpc(server, "weightsync_checksums", json.dumps(norms), "xxh3_64")
        assert len(per_worker) == 2
        for held in per_worker:  # each worker holds the new norms whole
            assert held == {n: checksum_tensor("xxh3_64", new[n]) for n in norms}
        served_like(engine, new)
        current = new


def test_workers_that_disagree_match_no_checksum() -> None:
    answers = [{"a": "1", "b": "2"}, {"a": "1", "b": "3"}, {"a": "1"}]
    assert _agreed(answers[:2]) == {"a": "1", "b": "workers disagree"}
    assert _agreed(answers[1:]) == {"a": "1", "b": "workers disagree"}  # one did not answer
    assert _agreed([]) == {}
