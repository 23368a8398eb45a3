"""Local deployments in the tests: snapshots written by a real training client for the
deployment tests, and what a deployment serves, as its manager reports (syncer tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from weightsync.deployment import DeploymentManager
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

API_KEY = "test-key-123"


class Snapshots:
    """A base and two deltas on top of it, written by a real training client."""

    def __init__(self, storage: Path, tok_dir: Path) -> None:
        model = build_model("tiny", seed=0)
        self.client = TrainingClient(model, storage=str(storage), tokenizer_dir=tok_dir)
        self.storage = str(storage)
        self.base = self.client.save_weights_for_sampler_ext("base").snapshot_name
        self.deltas = []
        for step in range(2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-2)
            self.deltas.append(self.client.save_weights_for_sampler_ext(f"d{step}").snapshot_name)
        #: A second, standalone base (the weights of the last delta).
        self.base2 = self.client.save_weights_for_sampler_ext("base2", "base").snapshot_name

    def metadata(self, identity: str) -> dict[str, str | None]:
        manifest = self.client.store.read_manifest(identity)
        return {
            "previous_snapshot_identity": manifest.parent,
            "compression_format": manifest.compression_format,
            "checksum_format": manifest.checksum_format,
        }


def serving(deploy_mgr: DeploymentManager, deployment_id: str) -> set[str | None]:
    """The snapshot identities the replicas of `deployment_id` serve now (its hot-load status)."""
    status = deploy_mgr.hotload_check_status(deployment_id)
    return {r["current_snapshot_identity"] for r in status["replicas"]}
