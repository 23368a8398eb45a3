"""The storage protocol: a small, flat view of one root (local directory or object store).

Paths are `/`-separated and relative to the root. Every write is atomic: a reader
sees either the previous bytes or the new ones, never a partial file. Missing
files raise `StorageFileNotFoundError`; a path the backend cannot hold (too long,
invalid there, or leaving the root) `StoragePathError` (bad input, never retried);
other failures `StorageError`, naming the URL. Calls may come from several threads at
once (a fetch's readers, a base save's writers), never two writes of one path.
"""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Protocol, runtime_checkable

from weightsync.errors import (
    InvalidInputError,
    StorageError,
    StorageFileNotFoundError,
    StoragePathError,
)


@runtime_checkable
class Storage(Protocol):
    """One storage root; see the module docstring for the rules every backend keeps."""

    url: str  # the root, normalized (no trailing slash)

    def child_url(self, *parts: str) -> str:
        """URL (or local path) of a path under the root."""
        ...

    def exists(self, path: str) -> bool: ...

    def read_bytes(self, path: str) -> bytes: ...

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Write atomically (temp + rename, or one object PUT); parents are created."""
        ...

    def list_dir(self, path: str = "") -> list[str]:
        """Names of the children of `path`, sorted; temporary files are never listed."""
        ...

    def size_bytes(self, path: str) -> int: ...

    def remove(self, path: str, *, recursive: bool = False) -> None: ...

    def local_path(self, path: str) -> pathlib.Path | None:
        """The path on local disk when the storage is local, else None."""
        ...


def split_path(path: str, *, url: str) -> list[str]:
    """Split a relative storage path into segments, refusing anything that leaves the root."""
    if not isinstance(path, str):
        raise InvalidInputError(f"storage path must be a string, got {type(path).__name__}")
    if path in ("", "."):
        return []
    if path.startswith("/") or "\\" in path:
        raise InvalidInputError(
            f"storage path {path!r} under {url} must be relative and '/'-separated"
        )
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidInputError(
                f"storage path {path!r} under {url} has an empty, '.' or '..' segment; "
                "paths must stay under the storage root"
            )
    return parts


# errno values that say the path itself is wrong, not that the storage failed.
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
_BAD_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EILSEQ})


def classify_os_error(error: OSError, action: str, target: str | os.PathLike[str]) -> StorageError:
    """The storage error for an `OSError` on `target`: missing, a bad path, or other."""
    if isinstance(error, FileNotFoundError) or error.errno in _MISSING_ERRNOS:
        return StorageFileNotFoundError(f"{os.fspath(target)} does not exist")
    if error.errno in _BAD_PATH_ERRNOS:
        return StoragePathError(
            f"cannot {action} {os.fspath(target)}: {error.strerror or error}; the name is not "
            "a valid path on this storage (check the identity and file name)"
        )
    return StorageError(f"cannot {action} {os.fspath(target)}: {error}")
