"""Fixtures for the engine tests: the tiny model, a tokenizer directory, a loaded engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from _support.models import snapshot_tensors, toy_model
from weightsync.server.engines.torch_engine import TorchEngine
from weightsync.toymodel import build_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # The tiny model's ops are far too small for intra-op threads to pay off; on a
    # shared 2-core machine they only make every step wait for the other thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model() -> Any:
    return toy_model()


@pytest.fixture
def engine(model: Any) -> TorchEngine:
    engine = TorchEngine(cache_block_tokens=4)
    engine.load_base(model.config.to_dict(), snapshot_tensors(model))
    return engine
