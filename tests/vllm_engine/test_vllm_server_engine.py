"""The `vllm` engine (vLLM's own server + sidecar) under the `sync` transition, directly.

One vLLM server serves the module. `sync` pauses vLLM with `mode=wait`: a stream
running when a swap starts finishes on the old weights (every token labelled
and computed with them), unlike `async` (`keep`; test_vllm_deployment.py), where
it continues on the new ones.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from safetensors.torch import load_file
from vllm_api_checks import as_result, stream_completion
from vllm_helpers import PROMPTS, check_against_reference, perturbed, reference_model

from weightsync.codec import DEFAULT_CHECKSUM, DEFAULT_CODEC, checksum_tensor, get_codec
from weightsync.server.engines import get_engine
from weightsync.server.engines.base import GenerateRequest
from weightsync.server.engines.vllm_server_engine import VllmServerEngine
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, torch.Tensor], Path]:
    root = tmp_path_factory.mktemp("sync")
    tok = build_tokenizer(root / "tok")
    model_dir = save_model_dir(build_model("small", seed=0), root / "base", tokenizer_dir=tok)
    config = json.loads((model_dir / "config.json").read_text())
    return config, load_file(str(model_dir / "model.safetensors")), model_dir


@pytest.fixture(scope="module")
def engine(base: tuple[dict, dict[str, torch.Tensor], Path]) -> Iterator[VllmServerEngine]:
    config, tensors, model_dir = base
    eng = get_engine(
        "vllm",
        transition="sync",
        max_model_len=512,
        max_num_seqs=4,
        kv_cache_memory_bytes=32 << 20,
        block_size=32,
        served_model_name="small",
        startup_timeout_s=360.0,
    )
    assert isinstance(eng, VllmServerEngine)
    try:
        with eng.swap("base-0"):
            eng.load_base(config, tensors, tokenizer_dir=model_dir)
        yield eng
    finally:
        eng.close()


def swap_to(engine: VllmServerEngine, identity: str, new: dict[str, torch.Tensor]) -> None:
    codec = get_codec(DEFAULT_CODEC)
    live = engine.named_weights()
    patches = {n: codec.decode_patch(codec.encode(live[n], new[n]), live[n]) for n in new}
    with engine.swap(identity):
        engine.apply_patches(patches, keep_undo=False)
        engine.reset_prompt_cache("all")


def test_sidecar_generate_and_worker_checksums(engine: VllmServerEngine, base: Any) -> None:
    _, tensors, _ = base
    ref = reference_model(tensors)
    for prompt in PROMPTS:
        result = engine.generate(
            GenerateRequest(prompt_token_ids=prompt, max_tokens=6, temperature=0.0, logprobs=2),
            step_guard=lambda: nullcontext("unused"),
        )
        check_against_reference(ref, prompt, result)
        assert result.token_snapshots == ["base-0"] * 6
        assert result.top_logprobs is not None and all(len(t) == 2 for t in result.top_logprobs)
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, t) for n, t in tensors.items()}
    assert engine.weights_checksums(DEFAULT_CHECKSUM) == want


def test_sync_swap_lets_running_streams_finish_on_the_old_weights(
    engine: VllmServerEngine, base: Any
) -> None:
    _, tensors, _ = base
    url = engine.inference_url
    assert url is not None
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    new = perturbed(tensors, seed=1)
    generating = threading.Event()
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out = stream_completion(
                client, "small", "the quick brown", max_tokens=400,
                on_tokens=generating.set, extra_body={"ignore_eos": True},
            )  # fmt: skip
            results.append(out)
        except BaseException as e:
            errors.append(e)
            generating.set()

    stream = threading.Thread(target=run)
    stream.start()
    assert generating.wait(timeout=120)
    swap_to(engine, "delta-1", new)  # `wait`: returns after the running stream finished
    stream.join(timeout=120)
    assert not errors and len(results) == 1, errors
    [out] = results
    assert len(out.token_ids) == 400
    assert out.labels == ["base-0"] * 400
    check_against_reference(
        reference_model(tensors), out.prompt_token_ids, as_result(out.token_ids, out.logprobs)
    )
    after = stream_completion(client, "small", "the quick brown", max_tokens=8)
    assert after.labels == ["delta-1"] * 8 and after.header == "delta-1"
    check_against_reference(
        reference_model(new), after.prompt_token_ids, as_result(after.token_ids, after.logprobs)
    )
    want = {n: checksum_tensor(DEFAULT_CHECKSUM, t) for n, t in new.items()}
    assert engine.weights_checksums(DEFAULT_CHECKSUM) == want
