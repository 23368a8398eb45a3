"""Storage errors and timeouts during fetch: transient ones are retried and the load succeeds;
persistent ones (and reads that hang) fail loudly within the configured limits."""

from __future__ import annotations

import time

import pytest

from _support.fault_rig import Rig, train_step
from _support.faulty_storage import Fault, in_snapshot
from weightsync.errors import HotloadFailedError, InvalidInputError, StorageError
from weightsync.server.fetch_policy import FetchPolicy, RetryingStorage
from weightsync.storage import open_storage

pytestmark = pytest.mark.timeout(120)

FAST_RETRY = FetchPolicy(attempts=3, backoff_s=0.01, timeout_s=5.0)


def _synced(rig: Rig, policy: FetchPolicy = FAST_RETRY):
    rig.start_replica(fetch=policy)
    client, syncer = rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    base = rig.sync(client, syncer, "step-0")
    assert isinstance(base, str), base
    train_step(client, seed=2)
    return client, syncer, base, f"step-1-{client.session_id}"


@pytest.mark.parametrize("failures", [1, 2])
def test_transient_storage_errors_are_retried(faults_rig, failures) -> None:
    client, syncer, _base, target = _synced(faults_rig)
    fault = faults_rig.faults.add(
        Fault("fail", in_snapshot(target, ".safetensors"), times=failures)
    )
    outcome = faults_rig.sync(client, syncer, "step-1")
    assert outcome == target, outcome
    assert fault.hits == failures
    obs = faults_rig.observe(
        f"transient storage error x{failures} during fetch", "retried; load succeeds",
        outcome, allowed={target},
    )  # fmt: skip
    assert obs.ledger_last is not None and obs.ledger_last["result"] == "ok"


def test_persistent_storage_error_fails_loudly(faults_rig) -> None:
    client, syncer, base, target = _synced(faults_rig)
    fault = faults_rig.faults.add(Fault("fail", in_snapshot(target, ".safetensors")))
    started = time.monotonic()
    outcome = faults_rig.sync(client, syncer, "step-1")
    assert isinstance(outcome, HotloadFailedError), outcome
    assert time.monotonic() - started < 30  # the syncer's hotload_timeout; retries are ms
    assert fault.hits >= FAST_RETRY.attempts  # every try of at least one file failed
    obs = faults_rig.observe(
        "persistent storage error during fetch", "load fails after the retries; old served",
        outcome, allowed={base},
    )  # fmt: skip
    assert obs.stage == "error" and "failed 3 time(s)" in (obs.error or "")
    assert target in (obs.error or "") and obs.ledger_last["result"] == "error"


def test_hung_read_fails_within_the_fetch_timeout(faults_rig) -> None:
    policy = FetchPolicy(attempts=1, backoff_s=0.0, timeout_s=1.0)
    client, syncer, base, target = _synced(faults_rig, policy)
    faults_rig.faults.add(Fault("hang", in_snapshot(target, ".safetensors")))
    outcome = faults_rig.sync(client, syncer, "step-1")
    assert isinstance(outcome, HotloadFailedError), outcome
    obs = faults_rig.observe(
        "storage read hangs during fetch", "load fails at the fetch timeout; old served",
        outcome, allowed={base},
    )  # fmt: skip
    assert "did not finish within 1s" in (obs.error or "")
    assert faults_rig.status()["last_load"]["total_s"] < 10
    # The hung read is abandoned, not fatal: the next sync (a base) loads.
    faults_rig.faults.clear()
    train_step(client, seed=3)
    outcome = faults_rig.sync(client, syncer, "step-2")
    assert outcome == f"step-2-{client.session_id}", outcome
    faults_rig.observe("after a hung read: next sync", "loads", outcome, allowed={outcome})


def test_slow_storage_within_the_timeout_loads(faults_rig) -> None:
    client, syncer, _base, target = _synced(faults_rig)
    faults_rig.faults.add(Fault("delay", in_snapshot(target), delay_s=0.2))
    outcome = faults_rig.sync(client, syncer, "step-1")
    assert outcome == target
    faults_rig.observe("slow storage (0.2 s per read)", "loads", outcome, allowed={target})


def test_retrying_storage_does_not_retry_missing_files(tmp_path) -> None:
    from _support.faulty_storage import FaultyStorage

    inner = FaultyStorage(open_storage(tmp_path))
    inner.write_bytes("a/b", b"x")
    retrying = RetryingStorage(inner, FetchPolicy(attempts=4, backoff_s=0.0))
    inner.add(Fault("missing", lambda p: p == "a/b"))
    with pytest.raises(FileNotFoundError):
        retrying.read_bytes("a/b")
    assert inner.reads == ["a/b"]  # one try: a missing file stays missing
    inner.clear()
    inner.add(Fault("fail", lambda p: p == "a/b"))
    with pytest.raises(StorageError, match="failed 4 time"):
        retrying.read_bytes("a/b")
    assert inner.reads.count("a/b") == 5


@pytest.mark.parametrize("kwargs", [dict(attempts=0), dict(backoff_s=-1.0), dict(timeout_s=0.0)])
def test_fetch_policy_validates(kwargs) -> None:
    with pytest.raises(InvalidInputError):
        FetchPolicy(**kwargs)
