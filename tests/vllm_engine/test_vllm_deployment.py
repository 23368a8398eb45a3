"""End to end: `weightsync serve --engine vllm` (vLLM's own server + the sidecar), driven
by an unchanged `WeightSyncer`.

A trainer hot-loads a base and three deltas into a real vLLM deployment; after
each, greedy tokens and logprobs are checked against a `transformers` reference
holding the trainer's exported weights, both through the sidecar (the SDK's
sampler) and through vLLM's own `/v1/completions` (streamed, with a stop string)
and `/v1/chat/completions` via the `openai` client. A delta whose parent is not
served and a corrupted delta are refused, and the old weights keep serving. Then
the prefix cache is observed kept (`reset_prompt_cache=False`) and dropped, and a
swap lands in the middle of concurrent streams. One deployment serves the module
(vLLM takes about a minute to start here); the tests run in file order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from _support.training import train_step
from _support.vllm_api import as_result, check_vllm_api, stream_completion
from _support.vllm_reference import (
    LONG_STREAM_LOGPROB_TOL,
    MODEL_SIZE,
    check_against_reference,
    reference_model,
)
from weightsync import WeightSyncer
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.server.engines.base import GenerateResult
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir
from weightsync.trainer import TrainingClient

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]

PROMPTS = [[{"role": "user", "content": "hi there"}], [{"role": "user", "content": "fox?"}]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e")
    tok_dir = Path(tokenizer.name_or_path)
    base_dir = save_model_dir(build_model(MODEL_SIZE, seed=5), root / "base", tokenizer_dir=tok_dir)
    mgr = DeploymentManager(registry_dir=root / "registry")
    mgr.create_or_get(
        DeploymentConfig(
            deployment_id="vllm-e2e",
            storage=str(root / "snapshots"),
            model_dir=str(base_dir),
            engine="vllm",
            model_name="small",
            startup_timeout_s=300.0,
        )
    )
    model = build_model(MODEL_SIZE, seed=0)
    model.train()
    client = TrainingClient(model, storage=str(root / "snapshots"), tokenizer_dir=tok_dir)
    client.optimizer = torch.optim.AdamW(client.model.parameters(), lr=3e-3)
    syncer = WeightSyncer(
        policy_client=client,
        deploy_mgr=mgr,
        deployment_id="vllm-e2e",
        warmup_retry_interval_s=0.2,
    )
    try:
        yield {"mgr": mgr, "client": client, "syncer": syncer}
    finally:
        mgr.delete("vllm-e2e")
        mgr.close()


def vllm_client(mgr: DeploymentManager) -> openai.OpenAI:
    """The `openai` client on vLLM's own server (the URL the replica's status names)."""
    url = load_status(mgr)["inference_url"]
    assert url, "the vllm replica names no inference_url"
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def check_serving(syncer: WeightSyncer, tokenizer: Any, identity: str, weights: dict) -> None:
    """Greedy completions (sidecar and vLLM's own API) name `identity`, match `weights`."""
    ref = reference_model(weights)
    check_vllm_api(vllm_client(syncer.deploy_mgr), "small", tokenizer, ref, identity)
    sampler = syncer.get_deployment_sampler(tokenizer=tokenizer)
    for messages in PROMPTS:
        [done] = sampler.sample(messages=messages, max_tokens=8, temperature=0.0)
        assert done.snapshot_identity == identity
        assert done.token_ids, "no tokens generated"
        result = GenerateResult(token_ids=done.token_ids, logprobs=done.logprobs)
        check_against_reference(ref, done.prompt_token_ids, result)


def load_status(mgr: DeploymentManager) -> dict[str, Any]:
    [replica] = mgr.hotload_check_status("vllm-e2e")["replicas"]
    return replica


def test_base_and_three_deltas_then_refusals(setup: dict[str, Any], tokenizer: Any) -> None:
    mgr, client, syncer = setup["mgr"], setup["client"], setup["syncer"]
    status = load_status(mgr)
    assert status["engine"] == "vllm" and status["transition"] == "async"
    timings = []
    identity = ""
    for step in range(4):
        train_step(client, tokenizer)
        identity = syncer.save_and_hotload(f"step-{step:05d}")
        assert identity is not None
        assert syncer.last_timing.checkpoint_type == ("base" if step == 0 else "delta")
        replica = load_status(mgr)
        assert replica["current_snapshot_identity"] == identity and replica["readiness"]
        timings.append(replica["last_load"])
        check_serving(syncer, tokenizer, identity, client.exported_weights())
    served_weights = client.exported_weights()

    # A delta whose parent the deployment does not serve is refused.
    train_step(client, tokenizer)
    skipped = syncer.save_only("step-00004", checkpoint_type="delta")
    train_step(client, tokenizer)
    orphan = syncer.save_only("step-00005", checkpoint_type="delta")
    assert skipped and orphan
    assert syncer.hotload(orphan, checkpoint_type="delta") is False
    assert load_status(mgr)["current_snapshot_identity"] == identity
    check_serving(syncer, tokenizer, identity, served_weights)

    # A corrupted delta (one flipped byte) is refused; the old weights keep serving.
    manifest = client.store.read_manifest(skipped)
    payload = sorted(f for f in manifest.files if f.endswith(".safetensors"))[0]
    path = client.store.storage.local_path(f"{skipped}/{payload}")
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert syncer.hotload(skipped, checkpoint_type="delta") is False
    replica = load_status(mgr)
    assert replica["current_snapshot_identity"] == identity
    assert replica["loading_state"]["stage"] == "error"
    assert replica["loading_state"]["target_snapshot_identity"] == skipped
    check_serving(syncer, tokenizer, identity, served_weights)

    for t in timings:
        print(
            f"vllm load {t['identity']} ({t['kind']}): fetch {t['fetch_s']:.3f}s decode "
            f"{t['decode_s']:.3f}s verify {t['verify_s']:.3f}s pause {t['pause_s']:.3f}s "
            f"total {t['total_s']:.3f}s"
        )


def test_prefix_cache_kept_or_dropped_by_the_reset_mode(
    setup: dict[str, Any], tokenizer: Any
) -> None:
    mgr, client, syncer = setup["mgr"], setup["client"], setup["syncer"]
    vllm = vllm_client(mgr)
    prompt = "the lazy dog jumps over the quick brown fox. " * 8  # several KV blocks
    stream_completion(vllm, "small", prompt, max_tokens=2)
    warm = stream_completion(vllm, "small", prompt, max_tokens=2)
    assert warm.cached_tokens and warm.cached_tokens > 0

    # reset_prompt_cache=False: vLLM keeps the prefix cache across the swap.
    syncer.reset_prompt_cache = False
    try:
        train_step(client, tokenizer)
        kept = syncer.save_and_hotload("step-00006")
    finally:
        syncer.reset_prompt_cache = True
    assert kept and load_status(mgr)["current_snapshot_identity"] == kept
    stale = stream_completion(vllm, "small", prompt, max_tokens=2)
    assert stale.labels == [kept] * 2
    assert stale.cached_tokens == warm.cached_tokens

    # The default (reset): the cache is dropped, the prompt is computed on the new weights.
    train_step(client, tokenizer)
    fresh = syncer.save_and_hotload("step-00007")
    assert fresh
    after = stream_completion(vllm, "small", prompt, max_tokens=4)
    assert after.cached_tokens == 0
    ref = reference_model(client.exported_weights())
    check_against_reference(ref, after.prompt_token_ids, as_result(after.token_ids, after.logprobs))
    check_serving(syncer, tokenizer, fresh, client.exported_weights())


def test_swap_during_concurrent_streams(setup: dict[str, Any], tokenizer: Any) -> None:
    """Each stream's tokens come in one range per snapshot, each matching that snapshot.

    Three threads send streams back to back from before the hot-load starts until it
    has returned. Their lengths differ, so vLLM's batch does not finish them in the
    same step and their gaps between streams do not line up, and each is several times
    longer than a tiny hot-load: some stream is generating when vLLM pauses. Whether
    one was is a matter of timing on the machine (on one CI runner no stream of 300
    tokens was), so up to three swaps are tried, each checked in full, until one lands
    inside a stream.
    """
    mgr, client, syncer = setup["mgr"], setup["client"], setup["syncer"]
    vllm = vllm_client(mgr)
    spans = []
    for attempt in range(3):
        spans.append(swap_under_streams(syncer, vllm, client, tokenizer, f"step-{8 + attempt:05d}"))
        if spans[-1]:
            break
    print(f"streams spanning each swap: {spans}")
    assert spans[-1] >= 1, f"no stream was generating when any of {len(spans)} swaps landed"


def swap_under_streams(
    syncer: WeightSyncer, vllm: openai.OpenAI, client: TrainingClient, tokenizer: Any, name: str
) -> int:
    """Hot-load a new step while streams run; check every stream; count those spanning it."""
    mgr = syncer.deploy_mgr
    old_identity = load_status(mgr)["current_snapshot_identity"]
    old_weights = client.exported_weights()
    train_step(client, tokenizer)
    saved = syncer.save_only(name)  # saved first: the hot-load below is only the load
    assert saved
    new_weights = client.exported_weights()
    prompts = ["hi there", "fox?", "the dog"]
    lengths = [900, 1100, 1300]
    results: list[tuple[int, Any]] = []
    errors: list[BaseException] = []
    generating = threading.Barrier(len(prompts) + 1, timeout=120)
    loaded = threading.Event()

    def run(i: int) -> None:
        first = [True]

        def on_tokens() -> None:
            if first[0]:
                first[0] = False
                generating.wait()

        try:
            while not loaded.is_set():
                out = stream_completion(
                    vllm, "small", prompts[i], max_tokens=lengths[i], on_tokens=on_tokens,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                results.append((lengths[i], out))
        except BaseException as e:
            errors.append(e)
            if first[0]:
                generating.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    try:
        generating.wait()  # every thread's first stream has its first tokens
        assert syncer.hotload(saved, checkpoint_type="delta")
    finally:
        loaded.set()
        for t in threads:
            t.join(timeout=300)
    new_identity = load_status(mgr)["current_snapshot_identity"]
    assert new_identity == saved
    assert not errors and results, errors
    refs = {old_identity: reference_model(old_weights), new_identity: reference_model(new_weights)}
    spanned = 0
    for k, (tokens, out) in enumerate(results):
        assert len(out.token_ids) == tokens and len(out.logprobs) == tokens
        # Labels are one range per snapshot: old first, then new.
        changes = [j for j in range(1, tokens) if out.labels[j] != out.labels[j - 1]]
        assert len(changes) <= 1 and set(out.labels) <= set(refs), (changes, set(out.labels))
        assert not changes or out.labels[0] == old_identity
        if not changes and 0 < k < len(results) - 1:
            continue  # one snapshot throughout, like the first and last, which are checked
        bounds = [0, *changes, tokens]
        for start, end in itertools.pairwise(bounds):
            ref = refs[out.labels[start]]
            prefix = out.prompt_token_ids + out.token_ids[:start]
            check_against_reference(
                ref,
                prefix,
                as_result(out.token_ids[start:end], out.logprobs[start:end]),
                tol=LONG_STREAM_LOGPROB_TOL,
            )
        spanned += bool(changes)
    # The first stream began on the old weights. (The last to end may still carry only
    # old labels: its tokens can all precede the pause while its final chunk arrives
    # after the hot-load returned.)
    assert results[0][1].labels[0] == old_identity
    return spanned
