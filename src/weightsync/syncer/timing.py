"""Timings of one weight sync (`WeightSyncer.last_timing`).

`last_timing` is the Fireworks SDK's dict: `save_time_s`, `hotload_time_s`,
`warmup_time_s` (each present when that phase ran) and `total_time_s`, in
seconds. weightsync adds keys of its own (bytes, pause, warmup outcome,
recovery); `SyncTiming` is that dict with typed attribute reads of every key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The SDK's keys, one per phase, in seconds.
SAVE_TIME_S = "save_time_s"
HOTLOAD_TIME_S = "hotload_time_s"
WARMUP_TIME_S = "warmup_time_s"
TOTAL_TIME_S = "total_time_s"
#: Stopwatch phase -> the SDK's key.
PHASE_KEYS = {"save": SAVE_TIME_S, "hotload": HOTLOAD_TIME_S, "warmup": WARMUP_TIME_S}


class SyncTiming(dict[str, Any]):
    """The SDK's timing dict of one `save_and_hotload` / `save_only` / `hotload` call, plus ours.

    Keys beyond the SDK's: `snapshot_name`, `checkpoint_type`, `payload_bytes`
    (bytes the snapshot wrote), `full_bytes` (a full bf16 snapshot of the same
    weights), `pause_s` (longest serving pause a replica reported; None: not
    reported), `warmed_up` (None: no warmup sent) and `recovered` (a refused
    delta was replaced by a base, `recover_with_base=True` only).
    """

    def __init__(self, **values: Any) -> None:
        super().__init__(
            snapshot_name=None,
            checkpoint_type=None,
            payload_bytes=0,
            full_bytes=0,
            pause_s=None,
            warmed_up=None,
            recovered=False,
        )
        self.update(values)

    def _seconds(self, key: str) -> float:
        return float(self.get(key, 0.0))

    @property
    def save_time_s(self) -> float:
        return self._seconds(SAVE_TIME_S)

    @property
    def hotload_time_s(self) -> float:
        return self._seconds(HOTLOAD_TIME_S)

    @property
    def warmup_time_s(self) -> float:
        return self._seconds(WARMUP_TIME_S)

    @property
    def total_time_s(self) -> float:
        return self._seconds(TOTAL_TIME_S)

    @property
    def snapshot_name(self) -> str | None:
        value = self["snapshot_name"]
        return None if value is None else str(value)

    @property
    def checkpoint_type(self) -> str | None:
        value = self["checkpoint_type"]
        return None if value is None else str(value)

    @property
    def payload_bytes(self) -> int:
        return int(self["payload_bytes"])

    @property
    def full_bytes(self) -> int:
        return int(self["full_bytes"])

    @property
    def pause_s(self) -> float | None:
        value = self["pause_s"]
        return None if value is None else float(value)

    @property
    def warmed_up(self) -> bool | None:
        value = self["warmed_up"]
        return None if value is None else bool(value)

    @property
    def recovered(self) -> bool:
        return bool(self["recovered"])

    @property
    def compression_ratio(self) -> float | None:
        """Full bf16 size over the bytes written (None when unknown)."""
        if self.payload_bytes <= 0 or self.full_bytes <= 0:
            return None
        return self.full_bytes / self.payload_bytes

    def record_phases(self, watch: Stopwatch) -> None:
        """Write the phases that ran, and the call's whole time, under the SDK's keys."""
        for phase, seconds in watch.seconds.items():
            self[PHASE_KEYS[phase]] = seconds
        self[TOTAL_TIME_S] = watch.elapsed_s()


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
