"""Rebuilding the weights a snapshot stands for, writing them out, and verifying a chain."""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from weightsync.errors import (
    ChainError,
    InvalidInputError,
    SnapshotCorruptError,
    UnknownChecksumError,
    UnknownCodecError,
)
from weightsync.snapshot.checks import verify_tensors
from weightsync.snapshot.layout import CONFIG_FILE, is_tokenizer_file
from weightsync.storage import open_storage

if TYPE_CHECKING:
    from weightsync.snapshot.reader import SnapshotStore

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What `SnapshotStore.verify` checked, and every problem it found."""

    identity: str
    kind: str
    chain: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    tensors_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def materialize(store: SnapshotStore, identity: str) -> dict[str, torch.Tensor]:
    """Rebuild the weights of `identity` from its base and deltas, verifying every step."""
    chain = store.chain(identity)
    weights = store.fetch(chain[0].identity).tensors()
    for manifest in chain[1:]:
        fetched = store.fetch(manifest.identity)
        for name, patch in fetched.patches(weights).items():
            patch.apply_(weights[name])
        # Checked after every link so a corrupt delta is named, not just the last one.
        verify_tensors(manifest, weights)
    return weights


def materialize_to(
    store: SnapshotStore, identity: str, output_dir: str | os.PathLike[str]
) -> pathlib.Path:
    """Write `identity` as a standalone HF directory (config, index, spec, shards, tokenizer).

    The output has no manifest: it is a model directory for `from_pretrained`, not a
    snapshot. `output_dir` must be missing or empty.
    """
    from weightsync.snapshot.writer import write_hf_files

    out = pathlib.Path(output_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"cannot materialize {identity!r} into {out}: it exists and is not an empty "
            "directory; choose a new output directory"
        )
    chain = store.chain(identity)
    if chain[-1].kind == "lora":
        raise InvalidInputError(
            f"snapshot {identity!r} is a LoRA adapter; it is already a standalone PEFT directory"
        )
    weights = materialize(store, identity)
    base = chain[0]
    config = store.read_file(chain[-1], CONFIG_FILE)
    extra = {
        name: store.read_file(base, name)
        for name in sorted(base.files)
        if is_tokenizer_file(name) and not name.endswith(".safetensors")
    }
    write_hf_files(open_storage(out), "", weights, config_bytes=config, extra_files=extra)
    logger.info("materialized %s into %s", identity, out)
    return out


def verify(store: SnapshotStore, identity: str) -> VerifyReport:
    """Check every file of every snapshot in the chain, then the materialized weights.

    Corruption and broken chains are reported, not raised; a missing snapshot or
    an invalid identity still raises.
    """
    head = store.read_manifest(identity)
    report = VerifyReport(identity=identity, kind=head.kind)
    try:
        chain = store.chain(identity)
    except (ChainError, SnapshotCorruptError, UnknownCodecError, UnknownChecksumError) as e:
        report.problems.append(str(e))
        return report
    report.chain = [m.identity for m in chain]
    for manifest in chain:
        for name in sorted(manifest.files):
            try:
                data = store.read_file(manifest, name)
            except SnapshotCorruptError as e:
                report.problems.append(str(e))
                continue
            report.files_checked += 1
            report.bytes_checked += len(data)
    if report.problems:
        return report
    try:
        weights = materialize(store, identity)
    except (ChainError, SnapshotCorruptError) as e:
        report.problems.append(str(e))
        return report
    report.tensors_checked = len(weights)
    return report
