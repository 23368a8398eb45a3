"""Storage over any fsspec filesystem (`s3://`, `gs://`, `memory://`, ...).

Object stores publish an object in one PUT, so a single `pipe_file` is already
atomic; other filesystems get a temporary name and a move.
"""

from __future__ import annotations

import pathlib
import secrets
from typing import Any

import fsspec

from weightsync.errors import StorageError
from weightsync.storage.base import classify_os_error, split_path
from weightsync.storage.local_storage import is_temp_name

# Filesystems where one PUT makes an object appear whole (no rename needed or offered).
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class FsspecStorage:
    """A root URL on an fsspec filesystem; `storage_options` go to the filesystem."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"cannot open storage {url!r}: {e} (for s3:// install the 's3' extra)"
            ) from e
        self.fs = fs
        self._root = root.rstrip("/")
        self.url = url.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self._atomic_put = any(p in _ATOMIC_PUT_PROTOCOLS for p in protocols)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _path(self, path: str) -> str:
        return "/".join([self._root, *split_path(path, url=self.url)])

    def child_url(self, *parts: str) -> str:
        segments = split_path("/".join(parts), url=self.url)
        return "/".join([self.url, *segments])

    def exists(self, path: str) -> bool:
        target = self._path(path)
        try:
            self.fs.invalidate_cache(target)
            return bool(self.fs.exists(target))
        except OSError as e:
            raise classify_os_error(e, "check", self.child_url(path)) from e

    def read_bytes(self, path: str) -> bytes:
        target = self._path(path)
        try:
            return bytes(self.fs.cat_file(target))
        except OSError as e:
            raise classify_os_error(e, "read", self.child_url(path)) from e

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        target = self._path(path)
        payload = bytes(data)
        try:
            if self._atomic_put:
                self.fs.pipe_file(target, payload)
                return
            parent, _, name = target.rpartition("/")
            tmp = f"{parent}/.{name}.{secrets.token_hex(4)}.tmp"
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(tmp, payload)
            self.fs.mv(tmp, target)
        except OSError as e:
            raise classify_os_error(e, "write", self.child_url(path)) from e

    def list_dir(self, path: str = "") -> list[str]:
        target = self._path(path)
        try:
            self.fs.invalidate_cache(target)
            entries = self.fs.ls(target, detail=False)
        except OSError as e:
            raise classify_os_error(e, "list", self.child_url(path)) from e
        names = {str(entry).rstrip("/").rpartition("/")[2] for entry in entries}
        names.discard("")
        return sorted(n for n in names if not is_temp_name(n))

    def size_bytes(self, path: str) -> int:
        target = self._path(path)
        try:
            self.fs.invalidate_cache(target)
            return int(self.fs.size(target))
        except OSError as e:
            raise classify_os_error(e, "stat", self.child_url(path)) from e

    def remove(self, path: str, *, recursive: bool = False) -> None:
        target = self._path(path)
        try:
            self.fs.invalidate_cache(target)
            # Object stores delete missing keys silently; the protocol says "not found".
            if not self.fs.exists(target):
                raise FileNotFoundError(target)
            self.fs.rm(target, recursive=recursive)
        except OSError as e:
            raise classify_os_error(e, "remove", self.child_url(path)) from e

    def local_path(self, path: str) -> pathlib.Path | None:
        return None
