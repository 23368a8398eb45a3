"""Plain helpers of the Fireworks SDK tests: SDK objects with their defaults, the proofs."""

from __future__ import annotations

from typing import Any

import httpx
import torch

from weightsync.codec import DEFAULT_CHECKSUM, checksum_tensor
from weightsync.trainer import TrainingClient

API_KEY = "fw-test-key"
TRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 2
PROMPT = [{"role": "user", "content": "hi there"}]
#: Keys the SDK's WeightSyncer writes into `last_timing` on a save_and_hotload.
SDK_TIMING_KEYS = {"save_time_s", "hotload_time_s", "warmup_time_s", "total_time_s"}


def sdk_manager(url: str) -> Any:
    """The real SDK's `DeploymentManager`, as its docs tell a user to point it at a gateway."""
    from fireworks.training.sdk import DeploymentManager

    return DeploymentManager(API_KEY, base_url=url, hotload_api_url=url, inference_url=url)


def train_step(client: TrainingClient, tokenizer: Any) -> None:
    """One optimizer step of next-token loss on a fixed text."""
    ids = torch.tensor([tokenizer(TRAIN_TEXT)["input_ids"]])
    client.optimizer.zero_grad()
    client.model(input_ids=ids, labels=ids).loss.backward()
    client.optimizer.step()


def served_checksums(url: str) -> dict[str, dict[str, str]]:
    """Per replica, what `GET /hot_load/v1/weights` reports for every live tensor now."""
    response = httpx.get(
        f"{url}/hot_load/v1/weights",
        params={"checksum_format": DEFAULT_CHECKSUM},
        headers={"X-Api-Key": API_KEY},
        timeout=30.0,
    )
    response.raise_for_status()
    return {r["replica_id"]: dict(r["checksums"]) for r in response.json()["replicas"]}


def trainer_checksums(client: TrainingClient) -> dict[str, str]:
    """The checksum of every tensor the trainer would save now (its bf16 export)."""
    return {
        name: checksum_tensor(DEFAULT_CHECKSUM, t) for name, t in client.exported_weights().items()
    }


def assert_serves_trainer_bits(url: str, client: TrainingClient, num_replicas: int) -> None:
    """Every replica's live weights are the trainer's, bit for bit (tensor checksums)."""
    expected = trainer_checksums(client)
    served = served_checksums(url)
    assert len(served) == num_replicas
    for replica_id, checksums in served.items():
        assert checksums == expected, f"{replica_id} does not serve the trainer's weights"


def serving(url: str) -> set[str | None]:
    response = httpx.get(
        f"{url}/hot_load/v1/models/hot_load", headers={"X-Api-Key": API_KEY}, timeout=30.0
    )
    response.raise_for_status()
    return {r["current_snapshot_identity"] for r in response.json()["replicas"]}


def reference_model(client: TrainingClient) -> Any:
    """The trainer's weights as the deployment should hold them: its bf16 export."""
    from weightsync.toymodel import build_model

    model = build_model("tiny", dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(client.exported_weights(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.eval()
    return model


@torch.no_grad()
def reference_greedy(model: Any, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(prompt_ids) :]


@torch.no_grad()
def reference_logprobs(model: Any, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """Log-probabilities the model gives `token_ids` after `prompt_ids` (fp32 log-softmax)."""
    ids = torch.tensor([prompt_ids + token_ids])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return [float(v) for v in logp.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1)]
