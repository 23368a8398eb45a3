"""How a replica reads snapshot files: transient storage errors retried, the fetch bounded.

Object stores fail now and then (a reset connection, a 503, a throttled GET);
a hot-load should ride over those. A storage that keeps failing, or a read that
never returns, must instead end the load loudly within a known time, while the
replica keeps serving what it had. `RetryingStorage` retries one read; the
replica bounds the whole fetch stage with `FetchPolicy.timeout_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from weightsync.errors import (
    InvalidInputError,
    StorageError,
    StorageFileNotFoundError,
    StoragePathError,
)
from weightsync.storage import Storage, StorageWrapper

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_FETCH_ATTEMPTS = 3
DEFAULT_FETCH_BACKOFF_S = 0.5
DEFAULT_FETCH_TIMEOUT_S = 600.0


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """Retries of one storage read, and the time limit of a load's whole fetch stage."""

    #: Tries per read (1 = no retry). Only transient `StorageError`s are retried: never
    #: "not found" nor a path the storage cannot hold (`StoragePathError`, bad input).
    attempts: int = DEFAULT_FETCH_ATTEMPTS
    #: Wait before the first retry; doubled for each further one.
    backoff_s: float = DEFAULT_FETCH_BACKOFF_S
    #: The fetch stage of one hot-load fails (stage "error") after this many seconds.
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidInputError(f"fetch attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0:
            raise InvalidInputError(f"fetch backoff_s must be >= 0, got {self.backoff_s}")
        if self.timeout_s <= 0:
            raise InvalidInputError(f"fetch timeout_s must be > 0, got {self.timeout_s}")


class RetryingStorage(StorageWrapper):
    """A `Storage` whose reads retry transient `StorageError`s (see `FetchPolicy`).

    A missing file is not retried: snapshots are immutable and their manifest is
    written last, so a file the manifest names and storage lacks stays missing. Nor
    is a path the storage cannot hold (too long, invalid, leaving the root): asking
    again cannot make it valid, and it is the caller's mistake, not the storage's.
    """

    def __init__(self, inner: Storage, policy: FetchPolicy) -> None:
        super().__init__(inner)
        self.policy = policy

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        delay = self.policy.backoff_s
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return call()
            except (StorageFileNotFoundError, StoragePathError):
                raise
            except StorageError as e:
                if attempt == self.policy.attempts:
                    raise StorageError(
                        f"{what} failed {attempt} time(s), giving up: {e}; check the storage "
                        "(credentials, network, bucket) and hot-load again"
                    ) from e
                logger.warning(
                    "%s failed (try %d of %d), retrying in %.2fs: %s",
                    what,
                    attempt,
                    self.policy.attempts,
                    delay,
                    e,
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    # --- reads (retried) ----------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        return self._retry(
            f"reading {self.inner.child_url(path)}", lambda: self.inner.read_bytes(path)
        )

    def exists(self, path: str) -> bool:
        return self._retry(
            f"checking {self.inner.child_url(path)}", lambda: self.inner.exists(path)
        )

    def size_bytes(self, path: str) -> int:
        return self._retry(
            f"sizing {self.inner.child_url(path)}", lambda: self.inner.size_bytes(path)
        )

    def list_dir(self, path: str = "") -> list[str]:
        return self._retry(
            f"listing {self.inner.child_url(path)}", lambda: self.inner.list_dir(path)
        )

    # The rest is forwarded unretried by StorageWrapper: a replica never writes snapshots.


__all__ = [
    "DEFAULT_FETCH_ATTEMPTS",
    "DEFAULT_FETCH_BACKOFF_S",
    "DEFAULT_FETCH_TIMEOUT_S",
    "FetchPolicy",
    "RetryingStorage",
]
