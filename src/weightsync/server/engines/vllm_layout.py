"""What both vLLM engines (`vllm`, vLLM's own server; `vllm-inprocess`) need to know of vLLM's
weight layout: which checkpoint tensors load into one fused layer, when a base is the model
already loaded, and the dtype vLLM computes in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from weightsync.errors import InvalidInputError

#: Config keys that differ between saves of the same model and change no output.
CONFIG_KEYS_IGNORED = frozenset({"transformers_version", "_name_or_path"})


def layer_groups(
    names: list[str], packed_modules_mapping: Mapping[str, list[str]]
) -> dict[str, tuple[str, ...]]:
    """Map each tensor name to all tensor names loaded into the same vLLM layer.

    vLLM fuses some checkpoint modules (q/k/v into `qkv_proj`, gate/up into
    `gate_up_proj`) and re-processes a layer only once every checkpoint tensor
    of it has arrived, so a push must carry whole layers.
    """
    fused = {part: packed for packed, parts in packed_modules_mapping.items() for part in parts}

    def layer_of(name: str) -> str:
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        return f"{parent}.{fused.get(leaf, leaf)}" if parent else fused.get(leaf, leaf)

    by_layer: dict[str, list[str]] = {}
    for name in names:
        by_layer.setdefault(layer_of(name), []).append(name)
    return {name: tuple(sorted(by_layer[layer_of(name)])) for name in names}


def layer_closure(groups: Mapping[str, tuple[str, ...]], changed: Iterable[str]) -> list[str]:
    """Every tensor of every layer that holds one of `changed` (what one push must carry)."""
    names: set[str] = set()
    for name in changed:
        names.update(groups[name])
    return sorted(names)


def same_model(
    served_config: Mapping[str, Any],
    served: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> bool:
    """Whether a base (`config`, `tensors`) is the model already loaded: same config but for
    `CONFIG_KEYS_IGNORED`, same tensor names, shapes and dtypes."""

    def clean(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in CONFIG_KEYS_IGNORED}

    if clean(served_config) != clean(config) or set(served) != set(tensors):
        return False
    return all(
        tuple(t.shape) == tuple(tensors[n].shape) and t.dtype == tensors[n].dtype
        for n, t in served.items()
    )


def model_dtype(host: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of the weights are stored in (what vLLM computes in)."""
    sizes: dict[torch.dtype, int] = {}
    for t in host.values():
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    if not sizes:
        raise InvalidInputError("the base has no floating-point tensors")
    return max(sizes, key=lambda d: sizes[d])
