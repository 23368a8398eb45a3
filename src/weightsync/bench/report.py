"""The benchmark's results: one JSON-ready report with codec, interval,
end-to-end and target sections.

Ratios are what the report is for: absolute times on a shared machine are
noisy, ratios measured in one run are not. Every row carries the numbers its
ratios were computed from, so a reader can recompute them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

REPORT_FORMAT_VERSION = 1
TargetStatus = Literal["met", "missed", "not-measured"]


@dataclass(frozen=True, kw_only=True)
class UpdateRow:
    """The change statistics of one optimizer step's bf16 snapshot pair."""

    lr: float
    step: int
    num_elements: int
    num_changed: int
    changed_fraction: float
    one_step_fraction: float  # of changes that move by exactly one key step (±1 ulp)
    bound_bytes: float  # n·H(p) + m·H(Δ), in bytes


@dataclass(frozen=True, kw_only=True)
class CodecRow:
    """One codec on one snapshot pair: size against full bf16 and the bound, speed."""

    method: str
    codec: str
    lr: float
    span_steps: int
    changed_fraction: float
    payload_bytes: int
    full_bytes: int
    bound_bytes: float
    encode_gbps: float
    decode_gbps: float
    lossless: bool
    # What the same tensor set encodes to when nothing changed: the codec's
    # fixed framing (measured for the default codec only; None elsewhere).
    unchanged_bytes: int | None = None

    @property
    def x_smaller(self) -> float:
        return self.full_bytes / max(self.payload_bytes, 1)

    @property
    def over_bound(self) -> float:
        return self.payload_bytes / max(self.bound_bytes, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "x_smaller": self.x_smaller, "over_bound": self.over_bound}


@dataclass(frozen=True, kw_only=True)
class SyncRow:
    """One `save_and_hotload`, as `WeightSyncer.last_timing` reported it."""

    name: str
    checkpoint_type: str
    save_s: float
    hotload_s: float
    warmup_s: float
    total_s: float
    pause_s: float
    payload_bytes: int


@dataclass(frozen=True, kw_only=True)
class EndToEndRow:
    """One method synced end to end into a local deployment (first base excluded).

    The per-sync properties are medians over `syncs`.
    """

    method: str
    codec: str
    checkpoint_type: str
    lr: float
    changed_fraction: float  # mean over the synced steps
    syncs: list[SyncRow]
    first_sync: SyncRow
    trainer_peak_rss_bytes: int
    trainer_added_rss_bytes: int
    replica_peak_rss_bytes: int
    lossless: bool
    #: `torch.save` of the same bf16 weights to the same disk after the syncs, and the
    #: fsync after it (medians; seconds): the baseline of the save targets.
    torch_save_s: float = 0.0
    torch_fsync_s: float = 0.0

    def _median(self, attr: str) -> float:
        # The median: robust to one sync slowed by a neighbour on a shared machine.
        values = sorted(float(getattr(s, attr)) for s in self.syncs)
        if not values:
            return 0.0
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    @property
    def save_s(self) -> float:
        return self._median("save_s")

    @property
    def hotload_s(self) -> float:
        return self._median("hotload_s")

    @property
    def warmup_s(self) -> float:
        return self._median("warmup_s")

    @property
    def total_s(self) -> float:
        return self._median("total_s")

    @property
    def pause_s(self) -> float:
        return self._median("pause_s")

    @property
    def payload_bytes(self) -> float:
        return self._median("payload_bytes")

    @property
    def pause_fraction(self) -> float:
        return self.pause_s / self.total_s if self.total_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("save_s", "hotload_s", "warmup_s", "total_s", "pause_s", "payload_bytes"):
            out[f"median_{key}"] = getattr(self, key)
        out["pause_fraction"] = self.pause_fraction
        return out


@dataclass(frozen=True, kw_only=True)
class TargetRow:
    """One stated target and whether this run met it."""

    name: str
    target: str
    measured: str
    status: TargetStatus
    limited_by: str


@dataclass(kw_only=True)
class BenchReport:
    """Everything one run measured, ready for the table, JSON and chart."""

    config: dict[str, Any]
    machine: dict[str, Any]
    model: dict[str, Any]
    memcpy_gbps: float
    updates: list[UpdateRow] = field(default_factory=list)
    codecs: list[CodecRow] = field(default_factory=list)
    intervals: list[CodecRow] = field(default_factory=list)
    end_to_end: list[EndToEndRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "config": self.config,
            "machine": self.machine,
            "model": self.model,
            "memcpy_gbps": self.memcpy_gbps,
            "updates": [asdict(u) for u in self.updates],
            "codecs": [c.to_json() for c in self.codecs],
            "intervals": [c.to_json() for c in self.intervals],
            "end_to_end": [e.to_json() for e in self.end_to_end],
            "targets": [asdict(t) for t in self.targets],
            "wall_s": self.wall_s,
        }

    def write_json(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(out)
        return out
