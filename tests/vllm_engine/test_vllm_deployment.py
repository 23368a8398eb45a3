"""End to end: `weightsync serve --engine vllm` driven by an unchanged `WeightSyncer`.

A trainer hot-loads a base and three deltas into a real vLLM deployment; after
each, greedy tokens and logprobs served by vLLM are checked against a
`transformers` reference holding the trainer's exported weights. A delta whose
parent is not served and a corrupted delta are refused, and the old weights keep
serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm_helpers import MODEL_SIZE, check_against_reference, reference_model

from weightsync import WeightSyncer
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.server.engines.base import GenerateResult
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir
from weightsync.trainer import TrainingClient

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]

TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 2
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


def train_step(client: TrainingClient, tokenizer: Any) -> None:
    ids = torch.tensor([tokenizer(TRAIN_TEXT)["input_ids"]])
    client.optimizer.zero_grad()
    client.model(input_ids=ids, labels=ids).loss.backward()
    client.optimizer.step()


def check_serving(syncer: WeightSyncer, tokenizer: Any, identity: str, weights: dict) -> None:
    """Greedy completions name `identity` and match the reference holding `weights`."""
    ref = reference_model(weights)
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
    assert load_status(mgr)["engine"] == "vllm"
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
