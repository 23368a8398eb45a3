"""Fixtures for the syncer tests: tiny real models, real clients, real local deployments.

`tok_dir`, `tokenizer`, `storage_dir`, `base_model_dir` and `deploy_mgr` are
`_support.training_fixtures`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _support.training_fixtures import new_client
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.trainer import TrainingClient

_ids = itertools.count()


@pytest.fixture(scope="session")
def start_deployment(
    deploy_mgr: DeploymentManager, storage_dir: Path, base_model_dir: Path
) -> Callable[..., str]:
    """Start a local deployment serving the untrained base model; return its id."""

    def start(**overrides: Any) -> str:
        deployment_id = f"dep-{next(_ids)}"
        config = dict(
            deployment_id=deployment_id,
            storage=str(storage_dir),
            model_dir=str(base_model_dir),
            model_name="tiny",
            startup_timeout_s=240.0,
        )
        config.update(overrides)
        deploy_mgr.create_or_get(DeploymentConfig(**config))
        return deployment_id

    return start


@pytest.fixture
def make_client(storage_dir: Path, tok_dir: Path) -> Callable[..., TrainingClient]:
    def make(*, seed: int = 0, lora_rank: int = 0, lr: float = 1e-2) -> TrainingClient:
        return new_client(storage_dir, tok_dir, seed=seed, lora_rank=lora_rank, lr=lr)

    return make


@pytest.fixture(scope="session")
def shared_deployment(start_deployment: Callable[..., str]) -> str:
    """One deployment for the tests whose trainers each start with a fresh base."""
    return start_deployment()
