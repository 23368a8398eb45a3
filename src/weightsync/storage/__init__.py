"""One small storage protocol over local paths and fsspec URLs; `open_storage` picks one."""

from __future__ import annotations

import os
from typing import Any

from weightsync.errors import InvalidInputError
from weightsync.storage.base import Storage
from weightsync.storage.fsspec_storage import FsspecStorage
from weightsync.storage.local_storage import LocalStorage
from weightsync.storage.wrapper import StorageWrapper


def open_storage(url_or_path: str | os.PathLike[str] | Storage, **storage_options: Any) -> Storage:
    """Return the storage for a local path, a `file://` URL or any fsspec URL.

    `storage_options` go to the fsspec filesystem (e.g. for `s3://`: `key`, `secret`,
    `client_kwargs={"endpoint_url": ...}`); a `Storage` passes through unchanged.
    """
    if isinstance(url_or_path, (LocalStorage, FsspecStorage)):
        return url_or_path
    if isinstance(url_or_path, os.PathLike):
        return LocalStorage(url_or_path)
    if isinstance(url_or_path, str):
        if url_or_path.startswith("file://"):
            return LocalStorage(url_or_path.removeprefix("file://"))
        if "://" not in url_or_path:
            return LocalStorage(url_or_path)
        return FsspecStorage(url_or_path, **storage_options)
    if isinstance(url_or_path, Storage):
        return url_or_path
    raise InvalidInputError(
        f"open_storage needs a path, URL or Storage, got {type(url_or_path).__name__}"
    )


__all__ = ["FsspecStorage", "LocalStorage", "Storage", "StorageWrapper", "open_storage"]
