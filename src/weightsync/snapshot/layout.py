"""File names, the shard plan, and the JSON side files of a snapshot directory.

Shard plan: tensors named `...layers.<i>.*` go to `model-{i+1:05d}.safetensors`
(one decoder layer per shard); every other tensor (embeddings, final norm,
lm_head) goes to `model-00000.safetensors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "model.weight.spec.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
NON_LAYER_SHARD = "model-00000.safetensors"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Files of a tokenizer directory that are never copied into a snapshot: ours, and weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
RESERVED_FILES = frozenset(
    {CONFIG_FILE, INDEX_FILE, SPEC_FILE, ADAPTER_CONFIG_FILE, "weightsync.json"}
)


def shard_file(name: str) -> str:
    """The shard file that holds tensor `name`."""
    match = _LAYER_RE.search(name)
    if match is None:
        return NON_LAYER_SHARD
    return f"model-{int(match.group(1)) + 1:05d}.safetensors"


def shard_plan(names: Sequence[str]) -> dict[str, list[str]]:
    """Shard file -> sorted tensor names, shards in file-name order."""
    plan: dict[str, list[str]] = {}
    for name in sorted(names):
        plan.setdefault(shard_file(name), []).append(name)
    return {f: plan[f] for f in sorted(plan)}


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a tokenizer directory is copied into a base snapshot."""
    return name not in RESERVED_FILES and not name.endswith(_WEIGHT_SUFFIXES)


def json_bytes(doc: Any) -> bytes:
    """The one JSON spelling of side files: 2-space indent, ASCII, trailing LF."""
    return (json.dumps(doc, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def index_doc(weight_map: Mapping[str, str], *, total_size_bytes: int) -> dict[str, Any]:
    """`model.safetensors.index.json`, as Hugging Face writes it."""
    return {
        "metadata": {"total_size": total_size_bytes},
        "weight_map": {name: weight_map[name] for name in sorted(weight_map)},
    }


def spec_doc(specs: Mapping[str, tuple[Sequence[int], str]]) -> dict[str, Any]:
    """`model.weight.spec.json`: name -> shape and dtype of every tensor."""
    return {
        "tensor_map": {
            name: {"shape": list(specs[name][0]), "dtype": specs[name][1]} for name in sorted(specs)
        }
    }
