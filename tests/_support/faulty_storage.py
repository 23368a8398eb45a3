"""A `Storage` wrapper that injects faults into reads: the seam the fault matrix uses.

Each `Fault` matches paths by a predicate and does one thing to matching reads:
fail with a `StorageError` (transient or persistent), report the file missing,
delay, hang until released, truncate, flip one byte, or serve other bytes. Writes pass through
(the trainer writes through its own, clean storage; the replica only reads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from weightsync.errors import StorageError, StorageFileNotFoundError
from weightsync.storage import Storage, StorageWrapper

FaultKind = Literal["fail", "missing", "delay", "hang", "truncate", "flip", "replace"]


@dataclass
class Fault:
    """What to do to reads of matching paths; `times=None` means every matching read."""

    kind: FaultKind
    match: Callable[[str], bool]
    times: int | None = None
    delay_s: float = 0.0
    #: Byte offset to flip (negative: from the end); for "truncate": bytes kept (negative: dropped).
    offset: int = 0
    #: For "replace": the bytes served instead of the file's.
    data: bytes = b""
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    def active(self) -> bool:
        return self.times is None or self.hits < self.times


def in_snapshot(identity: str, suffix: str = "") -> Callable[[str], bool]:
    """Paths of one snapshot's files (optionally only names ending in `suffix`)."""
    return lambda path: path.startswith(f"{identity}/") and path.endswith(suffix)


def flip_byte(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


class FaultyStorage(StorageWrapper):
    """Wraps a storage; reads of paths some active `Fault` matches are tampered with."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.faults: list[Fault] = []
        self.reads: list[str] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            for fault in self.faults:
                fault.released.set()
            self.faults.clear()

    def _take(self, path: str) -> list[Fault]:
        with self._lock:
            self.reads.append(path)
            taken = [f for f in self.faults if f.active() and f.match(path)]
            for fault in taken:
                fault.hits += 1
            return taken

    def _before(self, path: str, faults: list[Fault]) -> None:
        for fault in faults:
            if fault.kind == "fail":
                raise StorageError(f"injected fault: cannot read {self.child_url(path)}")
            if fault.kind == "missing":
                raise StorageFileNotFoundError(f"injected fault: {self.child_url(path)} missing")
            if fault.kind == "delay":
                time.sleep(fault.delay_s)
            if fault.kind == "hang":
                fault.released.wait(120)

    def read_bytes(self, path: str) -> bytes:
        faults = self._take(path)
        self._before(path, faults)
        data = self.inner.read_bytes(path)
        for fault in faults:
            if fault.kind == "truncate":
                data = data[: fault.offset]
            elif fault.kind == "flip":
                data = flip_byte(data, fault.offset)
            elif fault.kind == "replace":
                data = fault.data
        return data
