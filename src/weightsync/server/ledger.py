"""The replica's durable record of every load (SQLite, one file per replica).

Each row is one load attempt: its whole `LoadReport` (identity, kind, parent,
where the weights came from, result, error, per-stage timings, bytes), plus
whether it was a recovery. The replica restores the newest verified base/delta
(and its verified adapters) on restart. A reset deletes the rows and sets
`requires_base`, so the next load must be a base: the chain the trainer may
still hold is no longer trusted.

Schema versions (`PRAGMA user_version`): 0 was one column per timing; 2 keeps the
queried fields as columns and the record as JSON. A version-0 file is migrated
in place when opened. Every statement waits at most `busy_timeout_s` for a lock
another process holds, and a write is tried `write_attempts` times, so a ledger
call always returns or raises `LedgerError` within a bound.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from weightsync.errors import LedgerError
from weightsync.server.load_report import LoadReport

LEDGER_FILE = "ledger.sqlite3"
SCHEMA_VERSION = 2
T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS loads (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        identity TEXT NOT NULL,
        kind TEXT NOT NULL,
        result TEXT NOT NULL,
        recovered INTEGER NOT NULL DEFAULT 0,
        record TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
#: The first schema's columns, as it was (a migration reads them).
_V0_COLUMNS = (
    "identity", "kind", "parent", "source", "result", "error", "started_at", "finished_at",
    "fetch_s", "decode_s", "verify_s", "drain_s", "pause_s", "check_s", "total_s",
    "bytes_fetched", "reset_prompt_cache", "recovered",
)  # fmt: skip


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(kw_only=True)
class LedgerEntry:
    """One load attempt: the load's record, whether it was a restart's recovery, its row."""

    load: LoadReport
    recovered: bool = False
    seq: int | None = None

    @property
    def identity(self) -> str:
        return self.load.identity

    @property
    def kind(self) -> str:
        return self.load.kind

    @property
    def result(self) -> str:
        return self.load.result

    def to_json(self) -> dict[str, Any]:
        """The ledger route's entry: the record's fields, `recovered` and `seq`."""
        return {**self.load.to_json(), "recovered": self.recovered, "seq": self.seq}


@dataclass(frozen=True, kw_only=True)
class LedgerPolicy:
    """Bounds of every ledger call: lock wait per statement, tries per write, pause between."""

    busy_timeout_s: float = 1.0
    write_attempts: int = 3
    retry_pause_s: float = 0.2


class Ledger:
    """Thread-safe SQLite ledger at `<state_dir>/ledger.sqlite3`."""

    def __init__(self, state_dir: Path, *, policy: LedgerPolicy | None = None) -> None:
        """Open (creating or migrating) the ledger; `LedgerError` names the file if it cannot."""
        self.path = Path(state_dir) / LEDGER_FILE
        self.policy = policy if policy is not None else LedgerPolicy()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=self.policy.busy_timeout_s,
            )
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(
                f"cannot open the ledger {self.path}: {e}; check --state-dir is writable"
            ) from e
        try:
            self._check_intact()
            self._migrate()
            self._requires_base = (
                self._conn.execute("SELECT 1 FROM meta WHERE key = 'requires_base'").fetchone()
                is not None
            )
        except sqlite3.DatabaseError as e:
            self._conn.close()
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise LedgerError(
                    f"the ledger {self.path} is locked by another process ({e}); stop the "
                    "other replica using this --state-dir, or give this one its own"
                ) from e
            raise LedgerError(
                f"the ledger {self.path} is damaged ({e}); move it aside (e.g. `mv "
                f"{self.path} {self.path}.damaged`) and start again: the replica then "
                "starts from its --snapshot/--model-dir and records a new ledger"
            ) from e

    def _check_intact(self) -> None:
        row = self._conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this weightsync's {SCHEMA_VERSION}"
            )
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(loads)")}
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if "fetch_s" in columns:  # version 0: one column per field
                self._conn.execute("ALTER TABLE loads RENAME TO loads_v0")
            for statement in _SCHEMA:
                self._conn.execute(statement)
            if "fetch_s" in columns:
                rows = self._conn.execute(
                    f"SELECT seq, {', '.join(_V0_COLUMNS)} FROM loads_v0 ORDER BY seq"
                ).fetchall()
                for row in rows:
                    values = dict(zip(["seq", *_V0_COLUMNS], row, strict=True))
                    seq, recovered = values.pop("seq"), bool(values.pop("recovered"))
                    load = LoadReport.from_json(values)
                    self._insert(load, recovered=recovered, seq=seq)
                self._conn.execute("DROP TABLE loads_v0")
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _insert(self, load: LoadReport, *, recovered: bool, seq: int | None = None) -> int:
        cursor = self._conn.execute(
            "INSERT INTO loads (seq, identity, kind, result, recovered, record) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                seq,
                load.identity,
                load.kind,
                load.result,
                int(recovered),
                json.dumps(load.to_json()),
            ),
        )
        return int(cursor.lastrowid or 0)

    def _bounded(self, what: str, call: Callable[[], T]) -> T:
        """Run `call` under the lock, retrying a locked/busy database within the policy."""
        last: sqlite3.Error | None = None
        for attempt in range(self.policy.write_attempts):
            if attempt:
                time.sleep(self.policy.retry_pause_s)
            try:
                with self._lock:
                    return call()
            except sqlite3.OperationalError as e:
                last = e  # locked, busy, or the journal cannot be created: may pass
            except sqlite3.DatabaseError as e:
                raise LedgerError(
                    f"cannot {what} the ledger {self.path}: it is damaged ({e}); move it aside "
                    "and restart the replica"
                ) from e
        raise LedgerError(
            f"cannot {what} the ledger {self.path} after {self.policy.write_attempts} tries "
            f"({last}); another process may hold it locked, or its directory is not writable"
        ) from last

    def record(self, entry: LedgerEntry, *, adapters: list[str] | None = None) -> LedgerEntry:
        """Append one load attempt; a verified base clears `requires_base`.

        `adapters`: the LoRA adapters loaded now (least recently used first), which a
        restart reloads; None leaves the recorded set as it is.
        """

        def write() -> int:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                seq = self._insert(entry.load, recovered=entry.recovered)
                if adapters is not None:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('adapters', ?)",
                        (json.dumps(adapters),),
                    )
                if entry.result == "ok" and entry.kind == "base":
                    self._conn.execute("DELETE FROM meta WHERE key = 'requires_base'")
            return seq

        entry.seq = self._bounded("write", write)
        if entry.result == "ok" and entry.kind == "base":
            self._requires_base = False
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every recorded load, oldest first."""
        rows = self._bounded(
            "read",
            lambda: self._conn.execute(
                "SELECT seq, recovered, record FROM loads ORDER BY seq"
            ).fetchall(),
        )
        return [
            LedgerEntry(load=LoadReport.from_json(json.loads(r)), recovered=bool(rec), seq=seq)
            for seq, rec, r in rows
        ]

    def reset(self) -> int:
        """Forget every load; the next accepted load must be a base. Returns rows removed."""

        def write() -> int:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                removed = self._conn.execute("DELETE FROM loads").rowcount
                self._conn.execute("DELETE FROM meta WHERE key = 'adapters'")
                self._conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('requires_base', ?)",
                    (utc_now(),),
                )
            return int(removed)

        removed = self._bounded("reset", write)
        self._requires_base = True
        return removed

    @property
    def requires_base(self) -> bool:
        """Whether only a base is accepted next (kept in memory: status never waits on SQLite)."""
        return self._requires_base

    def recovery_plan(self) -> tuple[LedgerEntry | None, list[str]]:
        """The newest verified base/delta, and the adapters to load again (oldest use first).

        The adapters are those the last adapter load left loaded (the LRU limit unloads
        the rest), each verified in the ledger; a ledger written before that was recorded
        yields every verified adapter, at its newest load.
        """

        ok = [e for e in self.entries() if e.result == "ok"]
        weights = [e for e in ok if e.kind != "lora"]
        if not weights:
            return None, []
        verified: dict[str, None] = {}
        for e in ok:
            if e.kind == "lora":
                verified.pop(e.identity, None)
                verified[e.identity] = None
        kept = self._bounded(
            "read",
            lambda: self._conn.execute("SELECT value FROM meta WHERE key = 'adapters'").fetchone(),
        )
        if kept is None:
            return weights[-1], list(verified)
        return weights[-1], [name for name in json.loads(kept[0]) if name in verified]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
