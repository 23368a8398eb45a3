"""Fixtures of the fault matrix: a tokenizer, and a rig (replica + trainer) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from _support.fault_rig import Rig, rig
from weightsync.toymodel import build_tokenizer

# Tiny models on a shared 2-core machine: one intra-op thread is much faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def faults_rig(tmp_path: Path, tokenizer_dir: Path) -> Iterator[Rig]:
    """A rig whose replica is not started yet (tests pass replica options)."""
    with rig(tmp_path, tokenizer_dir) as r:
        yield r
