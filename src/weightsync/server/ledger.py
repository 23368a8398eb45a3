"""The replica's durable record of every load (SQLite, one file per replica).

Each row is one load attempt: identity, kind, parent, where it came from,
per-stage timings, the serving pause, bytes fetched, result and error. The
replica restores the newest verified base/delta (and its verified adapters) on
restart. A reset deletes the rows and sets `requires_base`, so the next
load must be a base: the chain the trainer may still hold is no longer trusted.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from weightsync.errors import StorageError

LoadKind = Literal["base", "delta", "lora"]
LoadResult = Literal["ok", "error"]
LEDGER_FILE = "ledger.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    identity TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent TEXT,
    source TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    fetch_s REAL NOT NULL DEFAULT 0,
    decode_s REAL NOT NULL DEFAULT 0,
    verify_s REAL NOT NULL DEFAULT 0,
    drain_s REAL NOT NULL DEFAULT 0,
    pause_s REAL NOT NULL DEFAULT 0,
    check_s REAL NOT NULL DEFAULT 0,
    total_s REAL NOT NULL DEFAULT 0,
    bytes_fetched INTEGER NOT NULL DEFAULT 0,
    reset_prompt_cache TEXT,
    recovered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(kw_only=True)
class LedgerEntry:
    """One load attempt. `source` is a storage URL or a model directory path."""

    identity: str
    kind: LoadKind
    parent: str | None
    source: str
    result: LoadResult
    error: str | None = None
    started_at: str
    finished_at: str
    fetch_s: float = 0.0
    decode_s: float = 0.0
    verify_s: float = 0.0
    drain_s: float = 0.0
    pause_s: float = 0.0
    check_s: float = 0.0
    total_s: float = 0.0
    bytes_fetched: int = 0
    reset_prompt_cache: str | None = None
    recovered: bool = False
    seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = [f.name for f in fields(LedgerEntry) if f.name != "seq"]


class Ledger:
    """Thread-safe SQLite ledger at `<state_dir>/ledger.sqlite3`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StorageError(
                f"cannot open the ledger {self.path}: {e}; check --state-dir is writable"
            ) from e

    def record(self, entry: LedgerEntry) -> LedgerEntry:
        """Append one load attempt; a verified base clears `requires_base`."""
        values = [getattr(entry, c) for c in _COLUMNS]
        sql = f"INSERT INTO loads ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        with self._lock, self._conn:
            cursor = self._conn.execute(sql, values)
            if entry.result == "ok" and entry.kind == "base":
                self._conn.execute("DELETE FROM meta WHERE key = 'requires_base'")
        entry.seq = cursor.lastrowid
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every recorded load, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT seq, {', '.join(_COLUMNS)} FROM loads ORDER BY seq"
            ).fetchall()
        out = []
        for row in rows:
            values = dict(zip(["seq", *_COLUMNS], row, strict=True))
            values["recovered"] = bool(values["recovered"])
            out.append(LedgerEntry(**values))
        return out

    def reset(self) -> int:
        """Forget every load; the next accepted load must be a base. Returns rows removed."""
        with self._lock, self._conn:
            removed = self._conn.execute("DELETE FROM loads").rowcount
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('requires_base', ?)",
                (utc_now(),),
            )
        return int(removed)

    @property
    def requires_base(self) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM meta WHERE key = 'requires_base'").fetchone()
        return row is not None

    def recovery_plan(self) -> tuple[LedgerEntry | None, list[LedgerEntry]]:
        """The newest verified base/delta, and every verified adapter (newest load of each)."""
        ok = [e for e in self.entries() if e.result == "ok"]
        weights = [e for e in ok if e.kind != "lora"]
        if not weights:
            return None, []
        last = weights[-1]
        adapters: dict[str, LedgerEntry] = {}
        for e in ok:
            if e.kind == "lora":
                adapters[e.identity] = e
        return last, list(adapters.values())

    def close(self) -> None:
        with self._lock:
            self._conn.close()
