"""One hot-load: its stages, and its record of timings, pause and bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from weightsync.server.ledger import LoadKind

#: The hot-load state machine's stages (drawn in `replica.py`).
Stage = Literal[
    "idle", "fetching", "decoding", "verifying", "swapping", "checking", "ready", "error"
]
LOADING_STAGES: tuple[Stage, ...] = ("fetching", "decoding", "verifying", "swapping", "checking")


@dataclass(kw_only=True)
class LoadReport:
    """Timings and size of one load (status `last_load`, ledger, metrics)."""

    identity: str
    kind: LoadKind
    result: Literal["ok", "error"]
    fetch_s: float = 0.0
    decode_s: float = 0.0
    verify_s: float = 0.0
    drain_s: float = 0.0
    pause_s: float = 0.0
    check_s: float = 0.0
    total_s: float = 0.0
    bytes_fetched: int = 0
    cache_entries_dropped: int = 0
