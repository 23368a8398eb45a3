"""Read-ahead for hot-load hints: a Storage wrapper that serves hinted files from memory.

`POST .../hot_load/hint` names files (or a whole snapshot) that will be loaded
soon; they are read in the background. When the load's fetch asks for one of
them it gets the bytes already read (once: the entry is dropped), or waits for
the read in flight. The fetch still verifies every file's checksum, so a hint
can only save time, never change what is loaded.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from weightsync.identity import validate_identity
from weightsync.snapshot import SnapshotStore
from weightsync.storage import Storage

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH_MAX_BYTES = 8 * 1024**3


class PrefetchingStorage:
    """A `Storage` whose `read_bytes` first looks at files read ahead by `hint`."""

    def __init__(
        self, inner: Storage, *, max_bytes: int = DEFAULT_PREFETCH_MAX_BYTES, max_workers: int = 4
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, Future[bytes]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="prefetch")

    # --- read-ahead -------------------------------------------------------

    def hint(self, paths: list[str]) -> list[str]:
        """Start reading `paths` (relative to the root); return those now queued."""
        queued = []
        for path in paths:
            size = self.inner.size_bytes(path)
            with self._lock:
                if path in self._pending:
                    continue
                reserved = sum(s for s, _ in self._pending.values())
                if reserved + size > self.max_bytes:
                    logger.warning(
                        "prefetch of %s skipped: the read-ahead cache is full (%d bytes)",
                        path,
                        self.max_bytes,
                    )
                    continue
                self._pending[path] = (size, self._pool.submit(self.inner.read_bytes, path))
            queued.append(path)
        return queued

    def drop(self, prefix: str) -> None:
        """Forget read-ahead entries under `prefix` (e.g. a loaded snapshot's directory)."""
        with self._lock:
            for path in [p for p in self._pending if p.startswith(prefix)]:
                del self._pending[path]

    def cached_paths(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- Storage ----------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            entry = self._pending.pop(path, None)
        if entry is None:
            return self.inner.read_bytes(path)
        # A failed read-ahead raises here, as the direct read would have.
        return entry[1].result()

    def child_url(self, *parts: str) -> str:
        return self.inner.child_url(*parts)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        self.inner.write_bytes(path, data)

    def list_dir(self, path: str = "") -> list[str]:
        return self.inner.list_dir(path)

    def size_bytes(self, path: str) -> int:
        return self.inner.size_bytes(path)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self.inner.remove(path, recursive=recursive)

    def local_path(self, path: str) -> Path | None:
        return self.inner.local_path(path)


__all__ = ["DEFAULT_PREFETCH_MAX_BYTES", "PrefetchingStorage"]


def hint_snapshot(
    store: SnapshotStore, storage: PrefetchingStorage, identity: str, files: list[str] | None
) -> tuple[str, list[str]]:
    """Queue `files` of snapshot `identity` (all its payload files when None) for read-ahead.

    Returns the validated identity and the file names now queued.
    """
    identity = validate_identity(identity)
    names = files if files is not None else list(store.read_manifest(identity).files)
    paths = []
    for name in names:
        validate_identity(name, what="file name")
        paths.append(f"{identity}/{name}")
    return identity, [p.split("/", 1)[1] for p in storage.hint(paths)]
