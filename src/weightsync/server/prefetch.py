"""Read-ahead for hot-load hints: a Storage wrapper that serves hinted files from memory.

`POST .../hot_load/hint` names files of a complete snapshot (its manifest lists
them) that will be loaded soon; they are read in the background. When the load's
fetch asks for one of them it gets the bytes already read (once: the entry is
dropped), or waits for the read in flight. The fetch still verifies every file's
checksum, so a hint can only save time, never change what is loaded.

What a hint can cost is bounded: only files the manifest lists, at the size it
states, inside the storage root (the storage refuses paths that resolve outside
it); at most `max_bytes` held in all; each entry dropped after `ttl_s`, when its
snapshot's load ends, or when that load is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from weightsync.errors import InvalidInputError
from weightsync.identity import validate_identity
from weightsync.snapshot import SnapshotStore
from weightsync.storage import Storage, StorageWrapper

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH_MAX_BYTES = 8 * 1024**3
DEFAULT_PREFETCH_TTL_S = 300.0


@dataclass(frozen=True)
class _Entry:
    size_bytes: int
    future: Future[bytes]
    expires_at: float


class PrefetchingStorage(StorageWrapper):
    """A `Storage` whose `read_bytes` first looks at files read ahead by `hint`."""

    def __init__(
        self,
        inner: Storage,
        *,
        max_bytes: int = DEFAULT_PREFETCH_MAX_BYTES,
        ttl_s: float = DEFAULT_PREFETCH_TTL_S,
        max_workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or ttl_s <= 0:
            raise InvalidInputError(
                f"prefetch max_bytes must be >= 0 and ttl_s > 0, got {max_bytes}, {ttl_s}"
            )
        super().__init__(inner)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Entry] = {}
        self._timer: threading.Timer | None = None
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="prefetch")

    # --- read-ahead -------------------------------------------------------

    def hint(self, files: Mapping[str, int]) -> list[str]:
        """Start reading `files` (path relative to the root -> the size its manifest states).

        Returns the paths now queued: a path already queued, or one that would take the
        bytes held past `max_bytes`, is left out; so is one whose size in storage differs
        from the stated one (its load would refuse it anyway).
        """
        queued = []
        for path, stated in files.items():
            size = self.inner.size_bytes(path)  # refuses paths that leave the storage root
            if size != stated:
                logger.warning(
                    "prefetch of %s skipped: %d bytes in storage, the manifest says %d",
                    path,
                    size,
                    stated,
                )
                continue
            with self._lock:
                self._expire_locked()
                if path in self._pending or self._closed:
                    continue
                held = sum(e.size_bytes for e in self._pending.values())
                if held + size > self.max_bytes:
                    logger.warning(
                        "prefetch of %s skipped: the read-ahead cache is full (%d of %d bytes)",
                        path,
                        held,
                        self.max_bytes,
                    )
                    continue
                future = self._pool.submit(self.inner.read_bytes, path)
                self._pending[path] = _Entry(size, future, self._clock() + self.ttl_s)
                self._schedule_locked()
            queued.append(path)
        return queued

    def drop(self, prefix: str) -> None:
        """Forget read-ahead entries under `prefix` (e.g. a loaded snapshot's directory)."""
        with self._lock:
            for path in [p for p in self._pending if p.startswith(prefix)]:
                self._pending.pop(path).future.cancel()

    def cached_paths(self) -> list[str]:
        with self._lock:
            self._expire_locked()
            return sorted(self._pending)

    def held_bytes(self) -> int:
        """Bytes reserved by the entries not yet expired, read or dropped."""
        with self._lock:
            self._expire_locked()
            return sum(e.size_bytes for e in self._pending.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pending.clear()
            if self._timer is not None:
                self._timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _expire_locked(self) -> None:
        now = self._clock()
        for path in [p for p, e in self._pending.items() if e.expires_at <= now]:
            logger.info("prefetched %s expired unused after %.0fs", path, self.ttl_s)
            self._pending.pop(path).future.cancel()

    def _schedule_locked(self) -> None:
        # One timer at a time, for the earliest expiry: memory is freed even if no one asks.
        if self._timer is not None or not self._pending:
            return
        delay = max(0.0, min(e.expires_at for e in self._pending.values()) - self._clock())
        self._timer = threading.Timer(delay + 0.01, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._expire_locked()
            if not self._closed:
                self._schedule_locked()

    # --- Storage (the rest is forwarded by StorageWrapper) --------------------

    def read_bytes(self, path: str) -> bytes:
        with self._lock:
            self._expire_locked()
            entry = self._pending.pop(path, None)
        if entry is None:
            return self.inner.read_bytes(path)
        # A failed read-ahead raises here, as the direct read would have.
        return entry.future.result()


__all__ = [
    "DEFAULT_PREFETCH_MAX_BYTES",
    "DEFAULT_PREFETCH_TTL_S",
    "PrefetchingStorage",
    "hint_snapshot",
    "read_ahead_dropped_on_refusal",
]


@contextmanager
def read_ahead_dropped_on_refusal(
    storage: PrefetchingStorage | None, identity: str
) -> Iterator[None]:
    """Around a hot-load's admission: if it raises, `identity`'s read-ahead is dropped
    (a refused load's hinted bytes would otherwise sit in memory until they expire)."""
    try:
        yield
    except BaseException:
        if storage is not None:
            storage.drop(f"{identity}/")
        raise


def hint_snapshot(
    store: SnapshotStore, storage: PrefetchingStorage, identity: str, files: list[str] | None
) -> tuple[str, list[str]]:
    """Queue `files` of snapshot `identity` (all the files its manifest lists when None).

    Only a complete snapshot can be hinted (no manifest: `SnapshotNotFoundError`), and
    only files its manifest lists (another name: `InvalidInputError`). Returns the
    validated identity and the file names now queued.
    """
    identity = validate_identity(identity)
    for name in files or ():  # a name that could leave the snapshot is refused unread
        validate_identity(name, what="file name")
    manifest = store.read_manifest(identity)
    names = files if files is not None else sorted(manifest.files)
    wanted: dict[str, int] = {}
    for name in names:
        entry = manifest.files.get(name)
        if entry is None:
            raise InvalidInputError(
                f"cannot read ahead {name!r} of snapshot {identity!r}: its manifest does not "
                "list that file; hint only files the manifest lists (or none, for all)"
            )
        wanted[f"{identity}/{name}"] = entry.size_bytes
    return identity, [p.split("/", 1)[1] for p in storage.hint(wanted)]
