"""A writer-preferring reader/writer lock: generation shares it, a weight swap owns it.

Readers are decoding steps (`async` transition) or whole generations (`sync`);
the writer is the swap. Once a swap waits, new readers wait behind it, so a
swap is never starved by a steady stream of requests, and the serving pause is
exactly the time the writer holds the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from weightsync.errors import SwapInProgressError


class SwapLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def swap_pending(self) -> bool:
        """True while a swap waits for, or holds, the lock."""
        with self._cond:
            return self._writer or self._writers_waiting > 0

    @contextmanager
    def shared(self, *, wait: bool = True) -> Iterator[None]:
        """Hold the shared side; `wait=False` raises `SwapInProgressError` rather than wait."""
        with self._cond:
            if not wait and (self._writer or self._writers_waiting):
                raise SwapInProgressError(
                    "a weight swap is in progress; retry shortly, or send the request "
                    "without 'x-weightsync-no-wait: true' to wait for it"
                )
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive side (waits for current readers to leave)."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
