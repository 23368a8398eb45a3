"""Fixtures for the server tests: a tokenizer, a base + delta chain, a running replica."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from _support.chain import Chain
from _support.models import snapshot_tensors, toy_model
from _support.serving import running_replica
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.toymodel import build_tokenizer

# Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two
# threads contending with everything else.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def chain(tmp_path: Path, tokenizer_dir: Path) -> Chain:
    """`base` → `step1` → `step2` → `step3`, written by the real snapshot writer."""
    model = toy_model()
    c = Chain(root=tmp_path / "store", config=model.config.to_dict(), tokenizer_dir=tokenizer_dir)
    base = c.base("base", snapshot_tensors(model))
    d1 = c.delta("step1", base, seed=1)
    d2 = c.delta("step2", d1, seed=2)
    c.delta("step3", d2, seed=3)
    return c


ServeFn = Callable[..., tuple[httpx.Client, Replica]]


@pytest.fixture
def serve(chain: Chain, tmp_path: Path) -> Iterator[ServeFn]:
    """`serve(**config)` → (client, replica): a replica of `chain`'s base on 127.0.0.1."""
    with ExitStack() as stack:

        def start(
            *, storage: Any = None, headers: dict[str, str] | None = None, **overrides: Any
        ) -> tuple[httpx.Client, Replica]:
            fields: dict[str, Any] = dict(
                storage=str(chain.root),
                snapshot=f"base-{'0badcafe'}",
                state_dir=tmp_path / "state",
            )
            fields.update(overrides)
            url, replica = stack.enter_context(
                running_replica(ReplicaConfig(**fields), storage=storage)
            )
            client = stack.enter_context(httpx.Client(base_url=url, timeout=60, headers=headers))
            return client, replica

        yield start
