"""LoRA adapters for the torch engine, loaded side by side into one model with PEFT.

Adapters are injected into the engine's `transformers` model (wrapped in a
`PeftModel`) under their names; the base weights stay the same tensors, so the
engine's `named_weights()` and in-place patches are unaffected. One adapter (or
none: the base model) is active at a time; the engine switches per step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict

from weightsync.errors import InvalidInputError, UnsupportedOperationError

logger = logging.getLogger(__name__)


class LoraAdapters:
    """The named LoRA adapters injected into one model (not thread-safe: the engine locks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._peft: PeftModel | None = None
        self._names: list[str] = []
        self._active: str | None = None

    def names(self) -> list[str]:
        """Loaded adapters, least recently used (loaded or activated) first."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def load(
        self, name: str, adapter_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Inject adapter `name` (replacing one of that name) and load its tensors strictly."""
        if not name:
            raise InvalidInputError("adapter name must be a non-empty string")
        config = _lora_config(name, adapter_config)
        if name in self._names:
            self.unload(name)
        try:
            if self._peft is None:
                self._peft = PeftModel(self._model, config, adapter_name=name)  # type: ignore[arg-type]
            else:
                self._peft.add_adapter(name, config)
        except (ValueError, TypeError, KeyError) as e:
            if self._peft is not None:
                # add_adapter records the config before injecting; forget the half-added one.
                self._peft.peft_config.pop(name, None)
            raise InvalidInputError(
                f"LoRA adapter {name!r} does not fit the loaded base model: {e}"
            ) from e
        self._names.append(name)
        self._active = None
        self._disable_all()
        try:
            result: Any = set_peft_model_state_dict(self._peft, dict(tensors), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            self.unload(name)
            raise InvalidInputError(f"LoRA adapter {name!r}: cannot load its tensors: {e}") from e
        unexpected = sorted(result.unexpected_keys)
        missing = sorted(k for k in result.missing_keys if f".{name}." in k or k.endswith(name))
        if unexpected or missing:
            self.unload(name)
            raise InvalidInputError(
                f"LoRA adapter {name!r} does not match its config: "
                f"unexpected tensors {unexpected[:5]}, missing tensors {missing[:5]}; "
                "export the adapter_config.json and adapter_model.safetensors together"
            )
        logger.info("loaded LoRA adapter %r (r=%s)", name, config.r)

    def unload(self, name: str) -> None:
        if name not in self._names:
            raise InvalidInputError(
                f"no LoRA adapter named {name!r} is loaded; loaded: {self._names or 'none'}"
            )
        if self._peft is None:  # pragma: no cover - names imply a PeftModel
            raise UnsupportedOperationError("adapter bookkeeping is inconsistent")
        self._names.remove(name)
        if self._names:
            # Point PEFT at a remaining adapter first: deleting the active one warns.
            self._lora_model().set_adapter(self._names[0])
            self._peft.delete_adapter(name)
        else:
            # Removing the last adapter restores the plain modules (same base tensors).
            self._lora_model().unload()
            self._peft = None
        self._active = None
        self._disable_all()
        logger.info("unloaded LoRA adapter %r", name)

    def activate(self, name: str | None) -> None:
        """Make `name` (None: the base model) the adapter the next forward runs with."""
        if name is not None and name not in self._names:
            raise InvalidInputError(
                f"unknown LoRA adapter {name!r}; loaded: {', '.join(self._names) or 'none'}"
            )
        if name is not None and self._names[-1] != name:
            self._names.remove(name)  # most recently used last: the LRU order
            self._names.append(name)
        if self._peft is None or name == self._active:
            return
        if name is None:
            self._disable_all()
        else:
            self._lora_model().enable_adapter_layers()
            self._lora_model().set_adapter(name)
        self._active = name

    def _disable_all(self) -> None:
        if self._peft is not None:
            self._lora_model().disable_adapter_layers()

    def _lora_model(self) -> Any:
        # PeftModel.base_model is the LoraModel tuner (typed loosely through nn.Module).
        return self._peft.base_model if self._peft is not None else None


def _lora_config(name: str, adapter_config: Mapping[str, Any]) -> LoraConfig:
    peft_type = str(adapter_config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedOperationError(
            f"adapter {name!r} has peft_type {peft_type!r}; the torch engine serves LORA only"
        )
    fields = {k: v for k, v in adapter_config.items() if k != "peft_type"}
    try:
        config = LoraConfig(**fields)
    except TypeError as e:
        # A config written by a newer PEFT may carry fields this one does not know.
        known = set(LoraConfig.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        try:
            config = LoraConfig(**{k: v for k, v in fields.items() if k in known})
        except (TypeError, ValueError) as e2:
            raise InvalidInputError(f"adapter {name!r}: invalid adapter_config: {e2}") from e2
        logger.warning(
            "adapter %r: ignoring unknown adapter_config fields %s (%s)", name, unknown, e
        )
    except ValueError as e:
        raise InvalidInputError(f"adapter {name!r}: invalid adapter_config: {e}") from e
    config.inference_mode = True
    return config
