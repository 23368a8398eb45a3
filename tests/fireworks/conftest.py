"""Fixtures for the Fireworks SDK tests: real `weightsync serve` processes, real SDK objects.

The deployments serve the untrained tiny model from a Hugging Face directory; the
trainers are weightsync `TrainingClient`s on the same storage (the SDK's
`policy_client`). Every SDK object is built with its defaults except the URLs.
`tok_dir`, `tokenizer`, `storage_dir`, `base_model_dir` and `deploy_mgr` are
`_support.training_fixtures`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _support.fireworks_sdk import API_KEY
from _support.training_fixtures import new_client
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.trainer import TrainingClient

_ids = itertools.count()


@pytest.fixture(scope="session")
def serve(
    deploy_mgr: DeploymentManager, storage_dir: Path, base_model_dir: Path
) -> Callable[..., tuple[str, str]]:
    """Start a `weightsync serve` with `replicas`; return (deployment id, URL)."""

    def start(replicas: int = 1) -> tuple[str, str]:
        deployment_id = f"fw-{next(_ids)}"
        # weightsync's manager, only to start and stop the `weightsync serve` processes.
        info = deploy_mgr.create_or_get(
            DeploymentConfig(
                deployment_id=deployment_id,
                storage=str(storage_dir),
                model_dir=str(base_model_dir),
                replicas=replicas,
                api_key=API_KEY,
                model_name="tiny",
                startup_timeout_s=240.0,
            )
        )
        assert info.url is not None
        return deployment_id, info.url

    return start


@pytest.fixture(scope="session")
def one_replica(serve: Callable[..., tuple[str, str]]) -> tuple[str, str]:
    return serve(1)


@pytest.fixture(scope="session")
def two_replicas(serve: Callable[..., tuple[str, str]]) -> tuple[str, str]:
    return serve(2)


@pytest.fixture
def make_client(storage_dir: Path, tok_dir: Path) -> Callable[..., TrainingClient]:
    """A training client with its defaults (arc_v2 deltas) and an optimizer."""

    def make(*, seed: int = 0, lora_rank: int = 0, **options: Any) -> TrainingClient:
        lr = 5e-2 if lora_rank else 1e-2
        return new_client(storage_dir, tok_dir, seed=seed, lora_rank=lora_rank, lr=lr, **options)

    return make
