"""LoRA: wrap a model with PEFT, export its adapter, and fold an adapter into base weights.

An adapter snapshot is a PEFT adapter directory (`adapter_config.json`,
`adapter_model.safetensors`) that `PeftModel.from_pretrained` loads. Folding
(`merged_base` snapshots, promotion of an adapter snapshot) computes
``W + scale · B @ A`` in float32 on an export copy, leaving the training model
untouched; the same function folds a live adapter and one read back from storage.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from weightsync.errors import InvalidInputError, UnsupportedOperationError

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "base_model.model."
_LINEAR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def wrap_for_lora(model: torch.nn.Module, *, rank: int, alpha: int) -> Any:
    """Wrap `model` with a LoRA adapter on every linear projection (not the output head).

    PEFT injects the adapter into `model` in place and freezes its base weights;
    the returned `PeftModel` is what the training loop should run and optimize.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise InvalidInputError(
            f"cannot add a LoRA adapter of rank {rank} to {type(model).__name__}: {e}; "
            "wrap the model with peft yourself and pass the PeftModel"
        ) from e


def active_lora_config(peft_model: Any) -> Any:
    """The `LoraConfig` of the active adapter, refusing what weightsync cannot export."""
    from peft import LoraConfig

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if not isinstance(config, LoraConfig):
        raise UnsupportedOperationError(
            f"adapter {name!r} is a {type(config).__name__}; weightsync exports LoRA "
            "adapters only (peft.LoraConfig)"
        )
    return config


def adapter_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """The active adapter's tensors, named as in `adapter_model.safetensors` (live, uncast)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter)
    return {name: tensor.detach() for name, tensor in state.items()}


def adapter_config_dict(peft_model: Any) -> dict[str, Any]:
    """The active adapter's `adapter_config.json` content, as PEFT writes it."""
    config = active_lora_config(peft_model)
    data: dict[str, Any] = _jsonable(config.to_dict())
    data["inference_mode"] = True
    if not data.get("base_model_name_or_path"):
        base_config = getattr(peft_model.get_base_model(), "config", None)
        name_or_path = getattr(base_config, "_name_or_path", None) or None
        data["base_model_name_or_path"] = name_or_path
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def base_named_tensors(peft_model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The wrapped model's own tensors under the names they had before PEFT wrapped it."""
    for key, tensor in peft_model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            del parts[i : i + 2]  # "modules_to_save.<adapter>" holds the trained copy
        yield ".".join(p for p in parts if p != "base_layer"), tensor


def fold_adapter(
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    adapter_config: Mapping[str, Any],
    *,
    dtype: torch.dtype,
    what: str,
) -> dict[str, torch.Tensor]:
    """Base weights with the adapter folded in, every tensor a fresh CPU copy in `dtype`.

    `base` maps un-wrapped weight names to tensors; `adapter` is a PEFT adapter state
    dict; the fold is computed in float32. Raises `UnsupportedOperationError` for
    adapter features that are not a plain low-rank update (DoRA, LoRA bias, ...).
    """
    _refuse_unfoldable(adapter_config, what=what)
    deltas = dict(_low_rank_pairs(adapter, what=what))
    missing = sorted(set(deltas) - set(base))
    if missing:
        raise UnsupportedOperationError(
            f"{what}: the adapter updates {missing[:3]} which the base weights do not hold "
            "(a tied or missing tensor); such an adapter cannot be folded"
        )
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, weight in base.items():
            if name not in deltas:
                out[name] = weight.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
                continue
            module, a, b, is_embedding = deltas[name]
            scale = _scaling(adapter_config, module, rank=a.shape[0])
            delta = b.detach().float().cpu() @ a.detach().float().cpu()
            transpose = is_embedding or bool(adapter_config.get("fan_in_fan_out"))
            if transpose:
                delta = delta.T
            if delta.shape != weight.shape:
                raise InvalidInputError(
                    f"{what}: adapter for {module!r} has shape {tuple(delta.shape)} but the "
                    f"base weight {name!r} is {tuple(weight.shape)}; was the adapter trained "
                    "on a different base model?"
                )
            merged = weight.detach().float().cpu() + delta * scale
            out[name] = merged.to(dtype).contiguous()
    return out


def _refuse_unfoldable(config: Mapping[str, Any], *, what: str) -> None:
    features = {
        "use_dora": "DoRA",
        "lora_bias": "a LoRA bias",
        "target_parameters": "target_parameters",
        "trainable_token_indices": "trainable tokens",
        "modules_to_save": "modules_to_save",
    }
    used = [label for key, label in features.items() if config.get(key)]
    if used:
        raise UnsupportedOperationError(
            f"{what}: cannot fold an adapter that uses {', '.join(used)} into base weights; "
            "use peft's `merge_and_unload()` and save the merged model yourself"
        )


def _low_rank_pairs(
    adapter: Mapping[str, torch.Tensor], *, what: str
) -> Iterator[tuple[str, tuple[str, torch.Tensor, torch.Tensor, bool]]]:
    """(base weight name, (module, A, B, is_embedding)) for every low-rank pair."""
    seen: set[str] = set()
    for key in adapter:
        module, kind = _split_adapter_key(key, what=what)
        if module in seen:
            continue
        seen.add(module)
        if kind == "linear":
            names = tuple(ADAPTER_PREFIX + module + s for s in _LINEAR_SUFFIXES)
        else:
            names = tuple(ADAPTER_PREFIX + module + s for s in _EMBEDDING_SUFFIXES)
        if names[0] not in adapter or names[1] not in adapter:
            raise InvalidInputError(
                f"{what}: adapter for {module!r} lacks one of {list(names)}; it is incomplete"
            )
        yield module + ".weight", (module, adapter[names[0]], adapter[names[1]], kind != "linear")


def _split_adapter_key(key: str, *, what: str) -> tuple[str, str]:
    if key.startswith(ADAPTER_PREFIX):
        for suffixes, kind in ((_LINEAR_SUFFIXES, "linear"), (_EMBEDDING_SUFFIXES, "embedding")):
            for suffix in suffixes:
                if key.endswith(suffix):
                    return key[len(ADAPTER_PREFIX) : -len(suffix)], kind
    raise UnsupportedOperationError(
        f"{what}: adapter tensor {key!r} is not a LoRA A/B matrix; only plain LoRA adapters "
        "can be folded into base weights"
    )


def _scaling(config: Mapping[str, Any], module: str, *, rank: int) -> float:
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
