"""Chain faults: a delta whose parent is missing, not served, or from another training run;
the same delta twice; deltas out of order. Each is refused (or answered idempotently) and the
replica keeps serving verified weights."""

from __future__ import annotations

import pytest

from _support.fault_rig import Rig, train_step

pytestmark = pytest.mark.timeout(120)

HOT_LOAD = "/hot_load/v1/models/hot_load"


def _chain(rig: Rig):
    """A trainer whose base is served, with two more deltas saved but not loaded."""
    rig.start_replica()
    client, syncer = rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    base = rig.sync(client, syncer, "step-0")
    assert isinstance(base, str), base
    train_step(client, seed=2)
    d1 = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    train_step(client, seed=3)
    d2 = rig.save(client, syncer, "step-2", checkpoint_type="delta")
    return client, syncer, base, d1, d2


def _post(rig: Rig, identity: str, previous: str | None = None):
    body: dict = {"identity": identity}
    if previous is not None:
        body["incremental_snapshot_metadata"] = {"previous_snapshot_identity": previous}
    return rig.http.post(HOT_LOAD, json=body)


def test_delta_whose_parent_is_missing(faults_rig) -> None:
    import shutil

    _client, syncer, base, d1, d2 = _chain(faults_rig)
    shutil.rmtree(faults_rig.root / "store" / d1)
    assert syncer.hotload(d2) is False
    r = _post(faults_rig, d2, d1)
    assert r.status_code == 409 and d1 in r.text and base in r.text
    obs = faults_rig.observe("delta whose parent is missing", "409; old served", r, allowed={base})
    assert obs.ledger_last["identity"] == base  # a refusal records nothing


def test_delta_out_of_order_then_in_order(faults_rig) -> None:
    _client, syncer, base, d1, d2 = _chain(faults_rig)
    assert syncer.hotload(d2) is False  # its parent d1 is not what the replica serves
    r = _post(faults_rig, d2, d1)
    assert r.status_code == 409 and f"serves {base!r}" in r.text
    faults_rig.observe(
        "delta whose parent is not what the replica serves (out of order)", "409; old served",
        r, allowed={base},
    )  # fmt: skip
    assert syncer.hotload(d1) is True
    assert syncer.hotload(d2) is True
    obs = faults_rig.observe(
        "the same deltas in order", "both load", "hotload() -> True, True", allowed={d2}
    )
    assert obs.ledger_ok[-2:] == [d1, d2]


def test_delta_from_another_training_run(faults_rig) -> None:
    client, _syncer, base, _, _ = _chain(faults_rig)
    other, other_syncer = faults_rig.trainer(seed=0)  # same init, another session
    assert other.session_id != client.session_id
    train_step(other, seed=1)  # the very same step: equal weights, other identities
    other_base = faults_rig.save(other, other_syncer, "step-0", checkpoint_type="base")
    train_step(other, seed=2)
    other_delta = faults_rig.save(other, other_syncer, "step-1", checkpoint_type="delta")
    assert other_syncer.hotload(other_delta) is False
    # Even a request that claims the served snapshot as the parent is refused: the
    # replica checks the manifest's parent too.
    r = _post(faults_rig, other_delta, base)
    assert r.status_code == 409 and other_base in r.text and base in r.text
    faults_rig.observe(
        "delta from another training run (claiming the served parent)", "409; old served",
        r, allowed={base},
    )  # fmt: skip


def test_same_delta_twice_is_applied_once(faults_rig) -> None:
    _client, syncer, base, d1, _ = _chain(faults_rig)
    assert syncer.hotload(d1) is True
    r = _post(faults_rig, d1, base)
    assert r.status_code == 200 and r.json()["status"] == "already_serving"
    assert syncer.hotload(d1) is True  # idempotent for the trainer too
    obs = faults_rig.observe(
        "the same delta sent twice", "200 already_serving; applied once", r, allowed={d1}
    )
    assert obs.ledger_ok.count(d1) == 1
