"""Fixtures for the deployment tests: snapshots from a real TrainingClient, a registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from weightsync.deployment import DeploymentConfig, DeploymentInfo, DeploymentManager
from weightsync.toymodel import build_model, build_tokenizer
from weightsync.trainer import TrainingClient


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


@pytest.fixture(scope="session")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Snapshots:
    tok_dir = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return Snapshots(tmp_path_factory.mktemp("storage"), tok_dir)


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def manager(registry_dir: Path) -> Iterator[DeploymentManager]:
    mgr = DeploymentManager(registry_dir=registry_dir)
    yield mgr
    for info in mgr.list_deployments():
        mgr.delete(info.deployment_id)
    mgr.close()


API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def deployment(manager: DeploymentManager, snapshots: Snapshots) -> DeploymentInfo:
    """The shared deployment `main` (one replica, API key `API_KEY`), started from the base."""
    config = DeploymentConfig(
        deployment_id="main",
        storage=snapshots.storage,
        snapshot=snapshots.base,
        api_key=API_KEY,
        model_name="tiny",
    )
    return manager.create_or_get(config)
