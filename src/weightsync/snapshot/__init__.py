"""Snapshots: the on-disk layout, manifests, atomic writing, reading, chains, materializing.

See FORMAT.md at the repository root for the byte-level specification.
"""

from weightsync.snapshot.checks import VerifyReport, verify_tensors
from weightsync.snapshot.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    SPEC_FILE,
    shard_file,
    shard_plan,
)
from weightsync.snapshot.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    SnapshotKind,
    TensorEntry,
)
from weightsync.snapshot.materialize import materialize_to
from weightsync.snapshot.reader import FetchedSnapshot, SnapshotStore
from weightsync.snapshot.writer import write_base, write_delta, write_lora

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "SPEC_FILE",
    "FetchedSnapshot",
    "FileEntry",
    "Manifest",
    "SnapshotKind",
    "SnapshotStore",
    "TensorEntry",
    "VerifyReport",
    "materialize_to",
    "shard_file",
    "shard_plan",
    "verify_tensors",
    "write_base",
    "write_delta",
    "write_lora",
]
