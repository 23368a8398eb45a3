"""Fixtures for the deployment tests: snapshots from a real TrainingClient, a registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _support.deployments import API_KEY, Snapshots
from weightsync.deployment import DeploymentConfig, DeploymentInfo, DeploymentManager
from weightsync.toymodel import build_tokenizer


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
