"""Fixtures for snapshot tests."""

from __future__ import annotations

import pytest

from weightsync.toymodel import model_config


@pytest.fixture
def tiny_config() -> object:
    """The tiny toy model's `transformers` config (what `write_base` gets from a trainer)."""
    return model_config("tiny")
