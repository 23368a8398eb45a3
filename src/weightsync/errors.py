"""One error tree for weightsync.

Every error is a `WeightSyncError`; each category also subclasses the matching
built-in so callers can catch either. Messages say what failed, which
snapshot/path/URL, and what to do (or the valid choices).
"""

from __future__ import annotations


class WeightSyncError(Exception):
    """Root of every error weightsync raises on purpose."""

    def add_context(self, *, before: str = "", after: str = "") -> None:
        """Put what a caller knows (which deployment, what to do) around the message, in
        place: the error keeps its type, attributes, cause and traceback as it propagates,
        instead of being rebuilt from its class."""
        self.args = (f"{before}{self}{after}",)


# --- bad input -------------------------------------------------------------


class InvalidInputError(WeightSyncError, ValueError):
    """A caller passed a value weightsync cannot accept; nothing was changed."""


class InvalidIdentityError(InvalidInputError):
    """A snapshot identity (or name) breaks the one-path-segment rule."""


class UnknownCodecError(InvalidInputError):
    """A compression format name is not registered."""


class UnknownChecksumError(InvalidInputError):
    """A checksum format name is not registered."""


class UnsupportedDtypeError(InvalidInputError):
    """A tensor's dtype cannot be encoded or exported."""


# --- snapshots -------------------------------------------------------------


class SnapshotNotFoundError(WeightSyncError, FileNotFoundError):
    """No complete snapshot (a directory with a manifest) exists at the location."""


class SnapshotCorruptError(WeightSyncError, ValueError):
    """A snapshot's bytes do not match its manifest (checksum, size, or format)."""


class PayloadCorruptError(SnapshotCorruptError):
    """Payload `index` of a batch handed to `Codec.decode_all` is malformed."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class ChecksumMismatchError(SnapshotCorruptError):
    """Bytes or weights do not hash to the checksum their manifest records."""


class ChainError(WeightSyncError, ValueError):
    """A delta cannot be applied: its parent is missing, different, or incompatible."""


# --- storage ---------------------------------------------------------------


class StorageError(WeightSyncError, OSError):
    """Storage could not be read or written (permissions, network, missing bucket)."""


# --- deployment / hot-load -------------------------------------------------


class DeploymentError(WeightSyncError, RuntimeError):
    """The deployment failed to do what was asked."""


class DeploymentHTTPError(DeploymentError):
    """An HTTP call to the deployment returned an error status."""

    def __init__(self, method: str, url: str, status_code: int, message: str) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.message = message
        super().__init__(f"{method} {url} -> HTTP {status_code}: {message}")


class DeploymentNotFoundError(DeploymentError, LookupError):
    """A request names a deployment (or account) the server does not serve (HTTP 404)."""


class DeploymentConflictError(DeploymentError):
    """A control-plane request conflicts with the served deployment, e.g. creating it again."""


class HotloadRefusedError(DeploymentError):
    """The deployment refused a hot-load (e.g. a delta whose parent it does not serve)."""


class HotloadFailedError(DeploymentError):
    """A replica reported `stage: "error"` for the requested snapshot."""


class HotloadTimeoutError(WeightSyncError, TimeoutError):
    """The deployment did not finish a hot-load (or become ready) in time."""


class StorageFileNotFoundError(StorageError, FileNotFoundError):
    """A file or directory does not exist in storage."""


class StoragePathError(StorageError, InvalidInputError):
    """A path cannot name a file of this storage (too long or invalid there, or it resolves
    outside the storage root): bad input, never retried as a transient error."""


class UnsupportedOperationError(WeightSyncError, RuntimeError):
    """The component cannot do this (e.g. an engine without LoRA support)."""


class DistributedSaveError(WeightSyncError, RuntimeError):
    """A sharded save did not complete on every rank (one failed, died or timed out);
    nothing was published."""


class SwapInProgressError(DeploymentError):
    """A weight swap is in progress and the caller asked not to wait (HTTP 425)."""


class OverloadedError(DeploymentError):
    """The replica's inference queue is full (HTTP 429 with `Retry-After`); retry later."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelledError(DeploymentError):
    """An inference request was abandoned by its client; its generation stopped."""


class LedgerError(DeploymentError):
    """A replica's ledger cannot be read or written (locked, damaged, unwritable state dir)."""
