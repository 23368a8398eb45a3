"""Where a replica's weights come from: a Hugging Face model directory, or snapshots, verified.

Only safetensors and JSON are read (never pickle), floating tensors are cast
to bf16 like every snapshot, and a tied duplicate (e.g. `lm_head.weight` of a
model with tied embeddings) is dropped by the rule a snapshot's export uses, so
a model directory yields exactly the tensors a base snapshot of it holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from weightsync.codec import checksum_bytes, checksum_tensor
from weightsync.errors import (
    DeploymentError,
    InvalidInputError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
)
from weightsync.server.load_report import LoadReport
from weightsync.server.tokenizer import TextTokenizer, load_tokenizer
from weightsync.snapshot import Manifest, SnapshotStore
from weightsync.snapshot.layout import TOKENIZER_MARKERS, is_tokenizer_file
from weightsync.snapshot.tied_weights import tied_duplicates

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FINGERPRINT_CHECKSUM = "xxh3_64"


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
    for duplicate, kept in _tied_in_model(config, what=f"model directory {model_dir}").items():
        if kept in tensors:
            tensors.pop(duplicate, None)
    return ModelWeights(
        config=config,
        tensors=tensors,
        tokenizer_dir=model_dir if has_tokenizer(model_dir) else None,
    )


def _tied_in_model(config: Mapping[str, Any], *, what: str) -> dict[str, str]:
    """The tied duplicates (dropped -> kept name) of the model `config` describes.

    Files cannot share memory, so the model is built, without weights, on the meta
    device and its ties found by storage (`tied_duplicates`). A config transformers
    cannot build a causal LM from has no known ties: every tensor is kept.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    doc = dict(config)
    model_type = doc.pop("model_type", None)
    if not isinstance(model_type, str):
        return {}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **doc))
    except (ValueError, TypeError, KeyError) as e:
        logger.info("%s: no tied weights known (transformers cannot build it: %s)", what, e)
        return {}
    return tied_duplicates(model.state_dict(keep_vars=True).items(), what=what)


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """One checksum of every tensor's name and bits: a restart knows a model dir is unchanged."""
    lines = "".join(
        f"{n}={checksum_tensor(FINGERPRINT_CHECKSUM, t)}\n" for n, t in sorted(tensors.items())
    )
    return f"{FINGERPRINT_CHECKSUM}:{checksum_bytes(FINGERPRINT_CHECKSUM, lines.encode())}"


def read_side_files(store: SnapshotStore, manifest: Manifest) -> dict[str, bytes]:
    """Every non-weight file of the snapshot, checked against the manifest; JSON ones parsed.

    A file whose bytes differ from the manifest, or a `.json` file that is not JSON, is a
    `SnapshotCorruptError` naming snapshot and file: found before anything is swapped.
    """
    weight_files = {f for e in manifest.tensors.values() for f in e.payload_files}
    out: dict[str, bytes] = {}
    for name in sorted(set(manifest.files) - weight_files):
        data = store.read_file(manifest, name)
        if name.endswith(".json"):
            try:
                json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SnapshotCorruptError(
                    f"snapshot {manifest.identity!r}, file {name!r} is not JSON ({e}); its "
                    "checksum matches, so it was saved broken: fix the tokenizer/config "
                    "directory and save a new base"
                ) from e
        out[name] = data
    return out


def verified_tokenizer(
    store: SnapshotStore, chain_base: Manifest, side_files: Mapping[str, bytes], root: Path
) -> tuple[Path | None, TextTokenizer | None]:
    """The chain base's tokenizer, from bytes already checked against its manifest.

    The files are written (temporary name, then rename) to `root/<identity>/`, a
    directory only the replica writes, and loaded from there: what is served never
    comes from unchecked bytes in storage. `(None, None)` when the base has none.
    """
    files = {n: d for n, d in side_files.items() if is_tokenizer_file(n)}
    if chain_base.kind != "base" or not any(m in files for m in TOKENIZER_MARKERS):
        return None, None
    dest = root / chain_base.identity
    if not dest.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{chain_base.identity}-", dir=root))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            staging.rename(dest)
        except OSError:  # another load wrote it meanwhile: same verified bytes
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = load_tokenizer(dest)
    tokenizer.directory = Path(chain_base.identity)  # errors name the snapshot, not a path
    return dest, tokenizer


def read_snapshot_weights(
    store: SnapshotStore, identity: str, tokenizer_root: Path
) -> ModelWeights:
    """A base/delta snapshot materialized and verified, with its verified config and tokenizer."""
    manifest = store.read_manifest(identity)
    if manifest.kind == "lora":
        raise InvalidInputError(
            f"snapshot {identity!r} is a LoRA adapter; start from a base (or delta) snapshot "
            "and hot-load the adapter"
        )
    chain = store.chain(identity)
    read_side_files(store, manifest)  # config, index, spec: checked and parsed
    tokenizer_dir, _ = verified_tokenizer(
        store, chain[0], read_side_files(store, chain[0]), tokenizer_root
    )
    return ModelWeights(
        config=store.read_config(identity),
        tensors=store.materialize(identity),
        tokenizer_dir=tokenizer_dir,
    )


def read_recorded_weights(
    store: SnapshotStore | None,
    record: LoadReport,
    *,
    ledger: Path,
    tokenizer_root: Path,
    parents: Mapping[str, str | None] | None = None,
) -> ModelWeights:
    """The weights a ledger record names, re-verified; `DeploymentError` when they cannot be.

    A snapshot is re-read from the storage it was loaded from and checked against its
    manifest; a model directory must still hold the weights the record fingerprinted.
    Nothing else is ever read in their place. `parents` (identity → parent, as the
    ledger recorded them) names the parents of Fireworks delta directories, which do
    not name their own.
    """
    identity = record.identity
    what_to_do = (
        f"restore it, or move the ledger {ledger} aside (or reset it) to start from "
        "--snapshot/--model-dir"
    )
    if record.source_kind == "model_dir":
        model_dir = Path(record.source)
        if not (model_dir / "config.json").is_file():
            raise DeploymentError(
                f"the ledger names {identity!r} from model directory {model_dir}, which is gone "
                f"or has no config.json; {what_to_do}"
            )
        weights = read_model_dir(model_dir)
        if record.weights_fingerprint is not None:
            found = fingerprint(weights.tensors)
            if found != record.weights_fingerprint:
                raise DeploymentError(
                    f"the ledger names {identity!r} from model directory {model_dir}, but its "
                    f"weights changed since ({found} != {record.weights_fingerprint}); "
                    f"{what_to_do}"
                )
        return weights
    if store is None or store.storage.url != record.source:
        raise DeploymentError(
            f"the ledger names {identity!r} from storage {record.source}, but this replica "
            f"reads {store.storage.url if store else 'no storage'}; start it with --storage "
            f"{record.source}, or {what_to_do}"
        )
    try:
        _read_chain_manifests(store, identity, parents or {})
    except SnapshotNotFoundError as e:
        raise DeploymentError(
            f"the ledger's last verified snapshot {identity!r} (or a snapshot of its chain) is "
            f"not in {store.storage.url} (deleted, or its manifest is gone); refusing to serve "
            f"anything else under its name — {what_to_do}"
        ) from e
    return read_snapshot_weights(store, identity, tokenizer_root)


def _read_chain_manifests(
    store: SnapshotStore, identity: str, parents: Mapping[str, str | None]
) -> None:
    """Read every manifest of `identity`'s chain, newest first, telling the store each
    Fireworks delta's recorded parent (later reads of the chain then find it)."""
    seen: set[str] = set()
    current: str | None = identity
    while current is not None and current not in seen:
        seen.add(current)
        current = store.read_manifest(current, parent=parents.get(current)).parent
