"""Engines a replica can run, by name: `torch` (embedded, default), `vllm` (vLLM's own
server beside the replica) and `vllm-inprocess` (vLLM inside the replica); both vLLM
engines need the optional extra.

`get_engine(name, **options)` builds one; options go to the engine's constructor.
The vLLM engine is imported only when asked for, so the core never needs vllm.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.server.engines.base import (
    CacheScope,
    Engine,
    GenerateRequest,
    GenerateResult,
    StepGuard,
)

DEFAULT_ENGINE = "torch"


def _torch_engine() -> type[Engine]:
    from weightsync.server.engines.torch_engine import TorchEngine

    return TorchEngine


def _vllm_installed() -> bool:
    # A regular package with an origin: a bare `vllm/` directory on sys.path (e.g.
    # a folder named vllm) would otherwise pass as an empty namespace package.
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def _vllm_module(module_name: str, class_name: str) -> type[Engine]:
    install = "install the vllm extra with scripts/install-vllm.sh, or use the 'torch' engine"
    if not _vllm_installed():
        raise UnsupportedOperationError(
            f"the 'vllm' engine needs vllm, which is not installed; {install}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnsupportedOperationError(
            f"the 'vllm' engine is not available ({e}); {install}"
        ) from e
    engine_class: type[Engine] = getattr(module, class_name)
    return engine_class


def _vllm_engine() -> type[Engine]:
    """vLLM's own OpenAI server beside the replica (the sidecar), patched in place."""
    return _vllm_module("weightsync.server.engines.vllm_server_engine", "VllmServerEngine")


def _vllm_inprocess_engine() -> type[Engine]:
    """vLLM's `LLMEngine` inside the replica, behind the replica's own OpenAI API."""
    return _vllm_module("weightsync.server.engines.vllm_engine", "VllmEngine")


_ENGINES: dict[str, Callable[[], type[Engine]]] = {
    "torch": _torch_engine,
    "vllm": _vllm_engine,
    "vllm-inprocess": _vllm_inprocess_engine,
}


def list_engines() -> list[str]:
    """Names `get_engine` accepts (an engine may still need its extra installed)."""
    return sorted(_ENGINES)


def get_engine(name: str, **options: Any) -> Engine:
    """Build the engine registered as `name`, passing `options` to its constructor."""
    resolve = _ENGINES.get(name)
    if resolve is None:
        raise InvalidInputError(
            f"unknown engine {name!r}; known engines: {', '.join(list_engines())}"
        )
    engine_class = resolve()
    try:
        return engine_class(**options)
    except TypeError as e:
        raise InvalidInputError(f"invalid options for engine {name!r}: {e}") from e


__all__ = [
    "DEFAULT_ENGINE",
    "CacheScope",
    "Engine",
    "GenerateRequest",
    "GenerateResult",
    "StepGuard",
    "get_engine",
    "list_engines",
]
