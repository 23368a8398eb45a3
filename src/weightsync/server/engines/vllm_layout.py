"""What both vLLM engines (`vllm`, vLLM's own server; `vllm-inprocess`) need to know of vLLM's
weight layout: which checkpoint tensors load into one fused layer, so a push carries whole
layers. (The same-model rule and the model dtype are every engine's: `engines/base.py`.)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


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
