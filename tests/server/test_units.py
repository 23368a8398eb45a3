"""The swap lock, the ledger and the cache-reset policy on their own."""

from __future__ import annotations

import threading
import time

import pytest

from weightsync.errors import InvalidInputError, SwapInProgressError
from weightsync.server.ledger import Ledger, LedgerEntry
from weightsync.server.load_report import LoadReport
from weightsync.server.swap_lock import SwapLock
from weightsync.wire import cache_reset_policy

pytestmark = pytest.mark.timeout(30)


def test_swap_lock_prefers_the_writer() -> None:
    lock = SwapLock()
    order: list[str] = []
    reader_in = threading.Event()

    def reader(name: str, hold: threading.Event | None = None) -> None:
        with lock.shared():
            order.append(name)
            if hold is not None:
                reader_in.set()
                hold.wait(10)

    def writer() -> None:
        with lock.exclusive():
            order.append("writer")

    release = threading.Event()
    first = threading.Thread(target=reader, args=("r1", release))
    first.start()
    assert reader_in.wait(10)
    w = threading.Thread(target=writer)
    w.start()
    while not lock.swap_pending:
        time.sleep(0.001)
    with pytest.raises(SwapInProgressError), lock.shared(wait=False):
        pass
    late = threading.Thread(target=reader, args=("r2",))
    late.start()
    release.set()
    for t in (first, w, late):
        t.join(10)
    assert order == ["r1", "writer", "r2"]  # the late reader waited behind the writer
    assert not lock.swap_pending


def _entry(identity: str, kind: str = "delta", result: str = "ok") -> LedgerEntry:
    load = LoadReport(
        identity=identity,
        kind=kind,  # type: ignore[arg-type]
        source="/store",
        result=result,  # type: ignore[arg-type]
        started_at="t0",
        finished_at="t1",
        pause_s=0.5,
    )
    return LedgerEntry(load=load)


def test_ledger_records_resets_and_plans_recovery(tmp_path) -> None:
    ledger = Ledger(tmp_path)
    ledger.record(_entry("b", "base"))
    ledger.record(_entry("d1"))
    ledger.record(_entry("a1", "lora"))
    ledger.record(_entry("d2", result="error"))
    last, adapters = ledger.recovery_plan()
    assert last is not None and last.identity == "d1"
    assert adapters == ["a1"]
    reopened = Ledger(tmp_path)
    assert [e.identity for e in reopened.entries()] == ["b", "d1", "a1", "d2"]
    assert reopened.entries()[1].load.pause_s == 0.5
    assert reopened.reset() == 4
    assert reopened.requires_base and reopened.recovery_plan() == (None, [])
    reopened.record(_entry("d3"))
    assert reopened.requires_base
    reopened.record(_entry("b2", "base"))
    assert not Ledger(tmp_path).requires_base


@pytest.mark.parametrize(
    ("value", "policy"),
    [
        (None, "all"),
        (True, "all"),
        (False, "none"),
        ("all", "all"),
        ("none", "none"),
        ("new_session", "new_session"),
    ],
)
def test_cache_reset_policy(value, policy) -> None:
    assert cache_reset_policy(value) == policy


@pytest.mark.parametrize("value", ["yes", 1, "ALL", ""])
def test_cache_reset_policy_rejects(value) -> None:
    with pytest.raises(InvalidInputError, match="reset_prompt_cache"):
        cache_reset_policy(value)
