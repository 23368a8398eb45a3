"""Where a replica's starting weights come from: a Hugging Face model directory.

Only safetensors and JSON are read (never pickle), floating tensors are cast
to bf16 like every snapshot, and a tied `lm_head.weight` duplicate is dropped,
so a model directory yields exactly the tensors a base snapshot of it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from weightsync.errors import InvalidInputError, SnapshotCorruptError
from weightsync.snapshot import SnapshotStore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_TIED_HEAD = "lm_head.weight"
_TIED_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True, kw_only=True)
class ModelWeights:
    """A complete model: HF config, tensors under HF names, and its tokenizer directory."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_dir: Path | None


def has_tokenizer(directory: Path | None) -> bool:
    return directory is not None and any((directory / f).is_file() for f in TOKENIZER_FILES)


def read_model_dir(model_dir: Path, *, dtype: torch.dtype = torch.bfloat16) -> ModelWeights:
    """Read a Hugging Face model directory (safetensors weights only)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise InvalidInputError(f"model directory {model_dir} has no config.json") from e
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{config_path} is not valid JSON: {e}") from e
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidInputError(
            f"model directory {model_dir} has no *.safetensors files; only safetensors "
            "weights are read (pickled .bin/.pt files never are) — convert them first"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise SnapshotCorruptError(f"cannot read safetensors file {file}: {e}") from e
        for name, raw in loaded.items():
            cast = raw.is_floating_point() and raw.dtype != dtype
            tensors[name] = (raw.to(dtype) if cast else raw).contiguous()
    if config.get("tie_word_embeddings", False) and _TIED_EMBEDDING in tensors:
        tensors.pop(_TIED_HEAD, None)
    return ModelWeights(
        config=config,
        tensors=tensors,
        tokenizer_dir=model_dir if has_tokenizer(model_dir) else None,
    )


#: Config keys that fix the architecture; a snapshot must agree on every one present.
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def config_mismatches(served: dict[str, Any], incoming: dict[str, Any]) -> list[str]:
    """Architecture keys on which two HF configs disagree, as `key: served != incoming`."""
    out = []
    for key in ARCHITECTURE_KEYS:
        mine, theirs = served.get(key), incoming.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            out.append(f"{key}: served {served[key]!r} != snapshot {incoming[key]!r}")
    return out


def read_start_weights(store: SnapshotStore | None, identity: str, source: str) -> ModelWeights:
    """The weights a replica starts from: a snapshot of `store` (materialized), or a model dir."""
    if store is None or (Path(source).is_dir() and not store.exists(identity)):
        return read_model_dir(Path(source))
    manifest = store.read_manifest(identity)
    if manifest.kind == "lora":
        raise InvalidInputError(
            f"snapshot {identity!r} is a LoRA adapter; start from a base (or delta) snapshot "
            "and hot-load the adapter"
        )
    tensors = store.materialize(identity)
    chain = store.chain(identity)
    tokenizer_dir = store.local_tokenizer_dir(chain[0].identity)
    return ModelWeights(
        config=store.read_config(identity),
        tensors=tensors,
        tokenizer_dir=tokenizer_dir if has_tokenizer(tokenizer_dir) else None,
    )
