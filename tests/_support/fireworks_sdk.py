"""Plain helpers of the Fireworks SDK tests: SDK objects with their defaults, the proofs.

The training step and the trainer-side reference are `_support.training`.
"""

from __future__ import annotations

from typing import Any

import httpx

from weightsync.codec import DEFAULT_CHECKSUM, checksum_tensor
from weightsync.trainer import TrainingClient

API_KEY = "fw-test-key"
#: Keys the SDK's WeightSyncer writes into `last_timing` on a save_and_hotload.
SDK_TIMING_KEYS = {"save_time_s", "hotload_time_s", "warmup_time_s", "total_time_s"}


def sdk_manager(url: str) -> Any:
    """The real SDK's `DeploymentManager`, as its docs tell a user to point it at a gateway."""
    from fireworks.training.sdk import DeploymentManager

    return DeploymentManager(API_KEY, base_url=url, hotload_api_url=url, inference_url=url)


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
