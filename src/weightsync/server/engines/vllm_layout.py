"""What both vLLM engines (`vllm`, vLLM's own server; `vllm-inprocess`) need to know of vLLM's
weights: the host copy a base starts from, which checkpoint tensors load into one fused layer
(so a push carries whole layers), and which ones vLLM keeps in checkpoint layout (so they can
be read back bit for bit). The same-model rule and the model dtype are every engine's
(`engines/base.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from weightsync.errors import InvalidInputError


def host_copy(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The engine's own CPU copy of a base vLLM can start (contiguous, sharing nothing).

    Refuses a base without tensors, or whose config has no `architectures` (vLLM picks
    the model class from it).
    """
    if not tensors:
        raise InvalidInputError("a base needs at least one tensor")
    if not config.get("architectures"):
        raise InvalidInputError(
            "the model config has no 'architectures'; vLLM picks the model class from it "
            "(e.g. ['Qwen3ForCausalLM']) — save the model with save_pretrained"
        )
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def checkpoint_layout_names(
    host: Mapping[str, torch.Tensor], parameters: Mapping[str, tuple[Sequence[int], str]]
) -> frozenset[str]:
    """Host tensors vLLM keeps as they are in the checkpoint (a parameter of the same name,
    shape and dtype in `parameters`, the worker's `weightsync_model_info`): the ones whose
    bits can be read back and compared."""
    return frozenset(
        name
        for name, t in host.items()
        if name in parameters
        and tuple(parameters[name][0]) == tuple(t.shape)
        and parameters[name][1] == str(t.dtype)
    )


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
