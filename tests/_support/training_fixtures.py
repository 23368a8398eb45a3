"""Fixtures of the end-to-end trainer tests (syncer, Fireworks SDK): tokenizer, storage, manager.

Registered for every folder by `pytest_plugins` in `tests/conftest.py`; a folder's
own fixture of the same name takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from weightsync.deployment import DeploymentManager
    from weightsync.trainer import TrainingClient

# weightsync.toymodel and the trainer import transformers: only when a fixture is used,
# so folders that use none of these do not pay for them.


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from weightsync.toymodel import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("snapshots")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """The untrained tiny model (seed 0) as a Hugging Face directory, in bf16."""
    from weightsync.toymodel import build_model, save_model_dir

    return save_model_dir(
        build_model("tiny", seed=0),
        tmp_path_factory.mktemp("base") / "tiny-base",
        tokenizer_dir=tok_dir,
    )


@pytest.fixture(scope="session")
def deploy_mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeploymentManager]:
    """weightsync's manager over a registry of this session; it deletes what it started."""
    from weightsync.deployment import DeploymentManager

    mgr = DeploymentManager(registry_dir=tmp_path_factory.mktemp("registry"))
    yield mgr
    for info in mgr.list_deployments():
        mgr.delete(info.deployment_id)
    mgr.close()


def new_client(
    storage_dir: Path, tok_dir: Path, *, seed: int, lora_rank: int, lr: float, **options: Any
) -> TrainingClient:
    """A training client of the tiny model (seed `seed`) with an AdamW over what it trains."""
    import torch

    from weightsync.toymodel import build_model
    from weightsync.trainer import TrainingClient

    model = build_model("tiny", seed=seed)
    model.train()
    client = TrainingClient(
        model, storage=str(storage_dir), lora_rank=lora_rank, tokenizer_dir=tok_dir, **options
    )
    params = [p for p in client.model.parameters() if p.requires_grad]
    client.optimizer = torch.optim.AdamW(params, lr=lr)
    return client
