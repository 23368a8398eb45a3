"""`StorageWrapper`: the one delegating `Storage`; a wrapper overrides only what it changes.

Wrappers add a concern at the storage seam (counting written bytes, reading ahead,
retrying reads, injecting faults in tests) without the snapshot code knowing. Each
one forwarding the whole protocol by hand would drift as the protocol grows; they
subclass this instead, so a new protocol method is forwarded once, here.
"""

from __future__ import annotations

import pathlib

from weightsync.storage.base import Storage


class StorageWrapper:
    """A `Storage` that forwards every call to `inner` unchanged.

    `url` is the inner storage's root (a wrapper is a view of the same files). A
    subclass overrides the methods it changes and calls `self.inner` for the rest.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def child_url(self, *parts: str) -> str:
        return self.inner.child_url(*parts)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.inner.read_bytes(path)

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        self.inner.write_bytes(path, data)

    def list_dir(self, path: str = "") -> list[str]:
        return self.inner.list_dir(path)

    def size_bytes(self, path: str) -> int:
        return self.inner.size_bytes(path)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self.inner.remove(path, recursive=recursive)

    def local_path(self, path: str) -> pathlib.Path | None:
        return self.inner.local_path(path)
