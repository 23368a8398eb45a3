"""Concurrency faults: two hot-loads racing on one replica, a hot-load while the replica is
still loading, a ledger reset while loading. One load runs at a time; the rest are refused
(409) or answered idempotently, and the replica serves one verified snapshot throughout."""

from __future__ import annotations

import threading

import pytest

from _support.fault_rig import Rig, hold_at, train_step
from _support.faulty_storage import Fault, in_snapshot

pytestmark = pytest.mark.timeout(120)

HOT_LOAD = "/hot_load/v1/models/hot_load"


def _bases(rig: Rig, count: int, **replica_options) -> list[str]:
    rig.start_replica(**replica_options)
    identities = []
    for i in range(count):
        client, syncer = rig.trainer(seed=i)
        train_step(client, seed=10 + i)
        identities.append(rig.save(client, syncer, f"run-{i}", checkpoint_type="base"))
    return identities


def test_two_hot_loads_racing(faults_rig) -> None:
    first, second, third = _bases(faults_rig, 3)
    gate = faults_rig.faults.add(Fault("hang", lambda p: p.endswith(".safetensors")))
    barrier = threading.Barrier(2)
    answers: dict[str, object] = {}

    def post(identity: str) -> None:
        barrier.wait()
        answers[identity] = faults_rig.http.post(HOT_LOAD, json={"identity": identity})

    threads = [threading.Thread(target=post, args=(i,)) for i in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    codes = sorted(r.status_code for r in answers.values())
    assert codes == [200, 409], {k: (r.status_code, r.text) for k, r in answers.items()}
    winner = next(k for k, r in answers.items() if r.status_code == 200)
    loser = first if winner == second else second
    assert winner in answers[loser].text  # the refusal names the load in progress
    # While it fetches: the old weights serve, verified; a third identity is refused too.
    assert faults_rig.status()["current_snapshot_identity"] == "tiny-base"
    assert faults_rig.http.post(HOT_LOAD, json={"identity": third}).status_code == 409
    gate.released.set()
    faults_rig.faults.clear()
    obs = faults_rig.observe(
        "two hot-loads racing on one replica", "one accepted, the other 409; winner served",
        f"codes {codes}", allowed={winner},
    )  # fmt: skip
    assert obs.ledger_ok[-1] == winner and loser not in {e["identity"] for e in faults_rig.ledger()}


def test_hot_load_while_still_loading(faults_rig) -> None:
    hook, reached, release = hold_at("verifying")
    (base,) = _bases(faults_rig, 1, on_stage=hook)
    client, syncer = faults_rig.trainer(seed=0)
    train_step(client, seed=1)
    first = faults_rig.sync(client, syncer, "step-0")  # a base: no verifying stage
    train_step(client, seed=2)
    delta = faults_rig.save(client, syncer, "step-1", checkpoint_type="delta")
    assert faults_rig.http.post(
        HOT_LOAD, json={"identity": delta,
                        "incremental_snapshot_metadata": {"previous_snapshot_identity": first}},
    ).json()["status"] == "accepted"  # fmt: skip
    assert reached.wait(30)
    status = faults_rig.status()
    assert status["loading_state"]["stage"] == "verifying" and status["readiness"] is True
    same = faults_rig.http.post(HOT_LOAD, json={"identity": delta})
    other = faults_rig.http.post(HOT_LOAD, json={"identity": base})
    assert same.json()["status"] == "loading"
    assert other.status_code == 409 and delta in other.json()["error"]["message"]
    release.set()
    obs = faults_rig.observe(
        "a hot-load while the replica is still loading",
        "same identity: 200 loading; another: 409; the first load completes",
        f"same -> {same.json()['status']}, other -> HTTP {other.status_code}", allowed={delta},
    )  # fmt: skip
    assert obs.ledger_ok[-1] == delta and base not in obs.ledger_ok


def test_ledger_reset_while_loading(faults_rig) -> None:
    base, other = _bases(faults_rig, 2)
    gate = faults_rig.faults.add(Fault("hang", in_snapshot(base, ".safetensors")))
    assert faults_rig.http.post(HOT_LOAD, json={"identity": base}).json()["status"] == "accepted"
    r = faults_rig.http.post("/hot_load/v1/ledger/reset")
    assert r.status_code == 409 and base in r.json()["error"]["message"]
    gate.released.set()
    obs = faults_rig.observe(
        "a ledger reset while loading", "409; the load completes; ledger intact", r,
        allowed={base},
    )  # fmt: skip
    assert obs.ledger_ok == ["tiny-base", base]
    # After the load, the reset goes through and only a base is accepted next.
    assert faults_rig.http.post("/hot_load/v1/ledger/reset").status_code == 200
    assert faults_rig.status()["requires_base"] is True
    assert faults_rig.http.post(HOT_LOAD, json={"identity": other}).status_code == 200
    faults_rig.observe("after the reset: a base", "loads", "accepted", allowed={other})
