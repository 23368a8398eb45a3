"""weightsync: fast, lossless, verified weight sync from an RL trainer into a deployment.

The public names live here. Importing `weightsync` stays light: each name is
imported from its module on first use (PEP 562 `__getattr__`), so torch and
transformers load only when a name that needs them is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from weightsync.errors import (
    ChainError,
    ChecksumMismatchError,
    DeploymentConflictError,
    DeploymentError,
    DeploymentHTTPError,
    DeploymentNotFoundError,
    DistributedSaveError,
    HotloadFailedError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidIdentityError,
    InvalidInputError,
    LedgerError,
    OverloadedError,
    PayloadCorruptError,
    RequestCancelledError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    StorageError,
    StorageFileNotFoundError,
    StoragePathError,
    SwapInProgressError,
    UnknownChecksumError,
    UnknownCodecError,
    UnsupportedDtypeError,
    UnsupportedOperationError,
    WeightSyncError,
)

if TYPE_CHECKING:
    from weightsync.codec import DEFAULT_CHECKSUM, DEFAULT_CODEC, get_codec, list_codecs
    from weightsync.deployment import DeploymentConfig, DeploymentManager, DeploymentSampler
    from weightsync.snapshot import SnapshotStore
    from weightsync.storage import open_storage
    from weightsync.syncer import WeightSyncer
    from weightsync.trainer import SaveSamplerResult, TrainingClient

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first use).
_LAZY: dict[str, str] = {
    "WeightSyncer": "weightsync.syncer",
    "DeploymentManager": "weightsync.deployment",
    "DeploymentConfig": "weightsync.deployment",
    "DeploymentSampler": "weightsync.deployment",
    "TrainingClient": "weightsync.trainer",
    "SaveSamplerResult": "weightsync.trainer",
    "SnapshotStore": "weightsync.snapshot",
    "open_storage": "weightsync.storage",
    "get_codec": "weightsync.codec",
    "list_codecs": "weightsync.codec",
    "DEFAULT_CODEC": "weightsync.codec",
    "DEFAULT_CHECKSUM": "weightsync.codec",
}

__all__ = [
    "DEFAULT_CHECKSUM",
    "DEFAULT_CODEC",
    "ChainError",
    "ChecksumMismatchError",
    "DeploymentConfig",
    "DeploymentConflictError",
    "DeploymentError",
    "DeploymentHTTPError",
    "DeploymentManager",
    "DeploymentNotFoundError",
    "DeploymentSampler",
    "DistributedSaveError",
    "HotloadFailedError",
    "HotloadRefusedError",
    "HotloadTimeoutError",
    "InvalidIdentityError",
    "InvalidInputError",
    "LedgerError",
    "OverloadedError",
    "PayloadCorruptError",
    "RequestCancelledError",
    "SaveSamplerResult",
    "SnapshotCorruptError",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StorageError",
    "StorageFileNotFoundError",
    "StoragePathError",
    "SwapInProgressError",
    "TrainingClient",
    "UnknownChecksumError",
    "UnknownCodecError",
    "UnsupportedDtypeError",
    "UnsupportedOperationError",
    "WeightSyncError",
    "WeightSyncer",
    "__version__",
    "get_codec",
    "list_codecs",
    "open_storage",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
