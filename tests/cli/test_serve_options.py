"""`weightsync serve` options through Typer's runner: a bad or absent device fails by name;
a drain bound without Ray, or a buffered swap for another engine, is a usage error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import weightsync.cli.serve  # noqa: F401  (registers the `serve` command)
from weightsync.cli import app
from weightsync.toymodel import build_model

runner = CliRunner()


# `serve` configures the root logger for its process.
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("root_logger_restored")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    build_model("tiny", seed=0).save_pretrained(path)
    return path


def test_an_unknown_device_is_refused_with_the_choices(model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["serve", "--model-dir", str(model_dir), "--device", "gpu", "--state-dir", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "unknown device 'gpu'; choose one of cpu, cuda, auto" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where torch has no CUDA")
def test_cuda_without_a_device_says_so_before_serving(model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["serve", "--model-dir", str(model_dir), "--device", "cuda", "--state-dir", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "--device cuda was asked for but torch sees no CUDA device" in result.output


def test_a_drain_timeout_without_ray_is_a_usage_error(model_dir: Path, tmp_path: Path) -> None:
    """Only a deployment on Ray is scaled (and drains what it removes)."""
    argv = ["serve", "--model-dir", str(model_dir), "--state-dir", str(tmp_path)]
    result = runner.invoke(app, [*argv, "--drain-timeout-s", "5"])
    assert result.exit_code == 2
    assert "--drain-timeout-s" in result.output and "--ray" in result.output


def test_a_buffered_swap_for_the_vllm_engine_is_a_usage_error(
    model_dir: Path, tmp_path: Path
) -> None:
    """Only the torch engine keeps a spare copy of the weights."""
    argv = ["serve", "--model-dir", str(model_dir), "--state-dir", str(tmp_path)]
    result = runner.invoke(app, [*argv, "--engine", "vllm", "--buffered-swap"])
    assert result.exit_code == 2
    assert "--buffered-swap" in result.output and "torch engine" in result.output
