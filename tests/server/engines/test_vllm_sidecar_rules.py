"""The `vllm` engine's rules that need no vLLM: which `vllm serve` flags it refuses, and
how its worker extension hands vLLM a push file (views of the file's pages, and no
parameter left viewing them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weightsync.errors import InvalidInputError
from weightsync.server.engines.vllm_push_file import write_push_file
from weightsync.server.engines.vllm_server_engine import VllmServerEngine, api_server_count
from weightsync.server.engines.vllm_worker import _mapped_safetensors, _own_storage


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ([], 1),
        (["--enforce-eager"], 1),
        (["--api-server-count", "2"], 2),
        (["--api-server-count=3"], 3),
        (["-asc", "1"], 1),
        (["--api-server-count", "4", "--api-server-count=1"], 1),  # the last one wins
    ],
)
def test_api_server_count_reads_every_spelling(args: list[str], count: int) -> None:
    assert api_server_count(args) == count


@pytest.mark.parametrize("args", [["--api-server-count"], ["--api-server-count=two"]])
def test_an_api_server_count_without_a_number_is_refused(args: list[str]) -> None:
    with pytest.raises(InvalidInputError, match="whole number"):
        api_server_count(args)


def test_more_than_one_api_server_is_refused_before_anything_starts() -> None:
    with pytest.raises(InvalidInputError, match="--api-server-count 2") as caught:
        VllmServerEngine(serve_args=["--api-server-count", "2"])
    assert "keep one API server" in str(caught.value)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 16, generator=gen).to(torch.bfloat16),
        "norm.weight": torch.randn(16, generator=gen),
        "empty.weight": torch.empty(0, 16, dtype=torch.bfloat16),
    }


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().copy()


def test_a_push_file_maps_to_views_with_the_written_bits(tmp_path: Path) -> None:
    host = _tensors()
    path = tmp_path / "push.safetensors"
    write_push_file(path, host, list(host), {}, frozenset())
    with _mapped_safetensors(str(path)) as (weights, (low, high)):
        assert sorted(name for name, _ in weights) == sorted(host)
        for name, tensor in weights:
            assert tensor.dtype == host[name].dtype and tensor.shape == host[name].shape
            assert np.array_equal(_bits(tensor), _bits(host[name]))
            if tensor.numel():  # a view of the file's pages, not a copy
                assert low <= tensor.untyped_storage().data_ptr() < high
        weights.clear()


def test_a_parameter_left_viewing_the_file_gets_its_own_copy(tmp_path: Path) -> None:
    host = _tensors()
    path = tmp_path / "push.safetensors"
    write_push_file(path, host, list(host), {}, frozenset())
    model = torch.nn.Module()
    model.embed = torch.nn.Module()
    model.embed.weight = torch.nn.Parameter(torch.zeros(64, 16, dtype=torch.bfloat16))
    model.register_buffer("norm", torch.zeros(16))
    model.kept = torch.nn.Parameter(torch.ones(3))
    with _mapped_safetensors(str(path)) as (weights, region):
        views = dict(weights)
        assert _own_storage(model, region) == 0  # nothing views the file yet
        # What a loader that aliases instead of copying would leave behind:
        model.embed.weight.data = views["embed.weight"]
        model.norm = views["norm.weight"]
        assert _own_storage(model, region) == 2
        low, high = region
        for tensor in (model.embed.weight, model.norm):
            assert not low <= tensor.untyped_storage().data_ptr() < high
        assert np.array_equal(_bits(model.embed.weight.data), _bits(host["embed.weight"]))
        assert np.array_equal(_bits(model.norm), _bits(host["norm.weight"]))
        assert torch.equal(model.kept.data, torch.ones(3))
        del views
        weights.clear()
    path.unlink()  # the copies outlive the file
    assert np.array_equal(_bits(model.embed.weight.data), _bits(host["embed.weight"]))
