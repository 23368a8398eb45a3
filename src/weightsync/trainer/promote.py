"""Promotion: a snapshot turned into a standalone Hugging Face model directory.

Promotable are bases (written out as they are) and LoRA adapters (folded into
the client's base weights, which LoRA training leaves frozen). A delta is not
promotable on its own: it is refused with its base named, unless the caller asks
for it to be materialized from its chain first.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import torch

from weightsync.errors import InvalidInputError, UnsupportedOperationError
from weightsync.snapshot import SnapshotStore, materialize_to
from weightsync.snapshot.layout import is_tokenizer_file
from weightsync.snapshot.writer import write_hf_files
from weightsync.storage import open_storage
from weightsync.trainer.export import is_plain_module_config
from weightsync.trainer.lora import fold_adapter

logger = logging.getLogger(__name__)


def promote(
    store: SnapshotStore,
    identity: str,
    output_dir: str | os.PathLike[str],
    *,
    materialize: bool,
    lora_base: LoraBase | None,
) -> pathlib.Path:
    """Write snapshot `identity` as a model directory `from_pretrained` loads; return it.

    `lora_base` supplies the base weights an adapter snapshot is folded into
    (None when the client is not a LoRA client).
    """
    manifest = store.read_manifest(identity)
    out = _empty_output_dir(identity, output_dir)
    if manifest.kind == "lora":
        if lora_base is None:
            raise UnsupportedOperationError(
                f"snapshot {identity!r} is a LoRA adapter; promote it from the LoRA training "
                "client whose base model it adapts (that client folds it into the base), or "
                f"load it with peft on top of the base model"
            )
        return _promote_lora(store, identity, out, lora_base)
    if manifest.kind == "delta" and not materialize:
        raise InvalidInputError(
            f"snapshot {identity!r} is a delta onto {manifest.parent!r} (chain base "
            f"{manifest.base!r}) and cannot be promoted on its own; promote the base "
            f"{manifest.base!r}, or pass materialize=True to rebuild {identity!r} from its "
            "chain and promote the result"
        )
    config = store.read_config(identity)
    if is_plain_module_config(config):
        raise UnsupportedOperationError(
            f"snapshot {identity!r} holds the weights of a plain torch module "
            f"({config.get('module_class', 'not a transformers model')}), which transformers "
            "cannot load; read its tensors with SnapshotStore.materialize() and load them "
            "into the module with load_state_dict"
        )
    path = materialize_to(store, identity, out)
    logger.info("promoted %s snapshot %s to %s", manifest.kind, identity, path)
    return path


class LoraBase:
    """What folding an adapter snapshot needs from the LoRA client."""

    def __init__(
        self,
        *,
        base_weights: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        dtype: torch.dtype,
        tokenizer_dir: pathlib.Path | None,
    ) -> None:
        self.base_weights = base_weights
        self.config = config
        self.dtype = dtype
        self.tokenizer_dir = tokenizer_dir


def _promote_lora(
    store: SnapshotStore, identity: str, out: pathlib.Path, lora_base: LoraBase
) -> pathlib.Path:
    if is_plain_module_config(lora_base.config):
        raise UnsupportedOperationError(
            f"snapshot {identity!r} adapts a plain torch module, which transformers cannot "
            "load; load the adapter with peft on top of the module instead"
        )
    adapter = store.fetch(identity).tensors()
    adapter_config = store.read_config(identity)
    weights = fold_adapter(
        lora_base.base_weights,
        adapter,
        adapter_config,
        dtype=lora_base.dtype,
        what=f"promoting LoRA snapshot {identity!r}",
    )
    config_bytes = (json.dumps(dict(lora_base.config), indent=2, sort_keys=True) + "\n").encode()
    write_hf_files(
        open_storage(out),
        "",
        weights,
        config_bytes=config_bytes,
        extra_files=_tokenizer_files(lora_base.tokenizer_dir),
    )
    logger.info("promoted LoRA snapshot %s (folded into the base weights) to %s", identity, out)
    return out


def _tokenizer_files(tokenizer_dir: pathlib.Path | None) -> dict[str, bytes]:
    if tokenizer_dir is None:
        return {}
    return {
        p.name: p.read_bytes()
        for p in sorted(tokenizer_dir.iterdir())
        if p.is_file() and is_tokenizer_file(p.name)
    }


def _empty_output_dir(identity: str, output_dir: str | os.PathLike[str]) -> pathlib.Path:
    out = pathlib.Path(output_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"cannot promote {identity!r} into {out}: it exists and is not an empty "
            "directory; choose a new output directory"
        )
    return out
