"""Fixtures for trainer tests: a tiny Qwen3 model in training, its optimizer, a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from weightsync.toymodel import build_model, build_tokenizer


@pytest.fixture
def model() -> Any:
    m = build_model("tiny", seed=0)
    m.train()
    return m


@pytest.fixture
def optimizer(model: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return build_tokenizer(tmp_path / "tokenizer")
