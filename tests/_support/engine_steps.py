"""Helpers for the engine tests: a prompt and a step guard (the toy model: `_support.models`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

PROMPT = [5, 17, 33, 8, 90, 41, 12, 77, 64, 3, 99, 21]


class RecordingGuard:
    """A step guard that counts steps and yields a settable identity (like the replica's)."""

    def __init__(self, identity: str = "snap-a") -> None:
        self.identity = identity
        self.entered = 0
        self.held = False
        self.lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[str]:
        with self.lock:
            self.entered += 1
            self.held = True
            try:
                yield self.identity
            finally:
                self.held = False
