"""One load: its stages, and its record (what, from where, result, timings, pause, bytes).

The record is the single description of a load: `LoadPipeline` fills it, status
reports it as `last_load`, and the ledger stores it whole (`LedgerEntry.load`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The stages (drawn in `load_pipeline.py`), kinds and results are the wire's enumerations.
from weightsync.wire import LoadKind, LoadResult, SourceKind


@dataclass(kw_only=True)
class LoadReport:
    """One load attempt: identity, origin, result and error, per-stage seconds and bytes.

    `source` is the storage URL (`source_kind="storage"`) or the model directory
    (`"model_dir"`); `weights_fingerprint` is the checksum of the per-tensor
    checksums of a model directory's weights, so a restart can tell it is unchanged.
    """

    identity: str
    kind: LoadKind
    parent: str | None = None
    source: str = ""
    source_kind: SourceKind = "storage"
    result: LoadResult = "error"
    error: str | None = None
    started_at: str = ""
    finished_at: str = ""
    fetch_s: float = 0.0
    decode_s: float = 0.0
    verify_s: float = 0.0
    #: The engine's preparation outside the pause (`Engine.stage_patches`).
    stage_s: float = 0.0
    drain_s: float = 0.0
    pause_s: float = 0.0
    check_s: float = 0.0
    total_s: float = 0.0
    bytes_fetched: int = 0
    cache_entries_dropped: int = 0
    reset_prompt_cache: str | None = None
    weights_fingerprint: str | None = None
    #: What the snapshot's layout cannot prove (a Fireworks layout; empty for weightsync's).
    cannot_prove: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LoadReport:
        """The record `to_json` wrote (unknown keys, from a newer version, are ignored)."""
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**known)
