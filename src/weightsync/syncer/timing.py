"""Timings of one weight sync (`WeightSyncer.last_timing`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(kw_only=True)
class SyncTiming:
    """Seconds and bytes of the last `save_and_hotload` / `save_only` / `hotload` call."""

    snapshot_name: str | None = None
    checkpoint_type: str | None = None
    save_s: float = 0.0
    hotload_s: float = 0.0
    warmup_s: float = 0.0
    total_s: float = 0.0
    #: Bytes the snapshot wrote, and what a full bf16 snapshot of the same weights takes.
    payload_bytes: int = 0
    full_bytes: int = 0
    #: Longest serving pause a replica reported for this load (None: not loaded/reported).
    pause_s: float | None = None
    #: Whether the post-load warmup answered (None: no warmup was sent).
    warmed_up: bool | None = None
    #: True when a refused/failed delta was replaced by a freshly saved base.
    recovered: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def compression_ratio(self) -> float | None:
        """Full bf16 size over the bytes written (None when unknown)."""
        if self.payload_bytes <= 0 or self.full_bytes <= 0:
            return None
        return self.full_bytes / self.payload_bytes


class Stopwatch:
    """Accumulates seconds of named phases: `with watch.phase("save"): ...`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start
