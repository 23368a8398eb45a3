"""DeploymentManager against real `weightsync serve` processes on 127.0.0.1."""

from __future__ import annotations

import psutil
import pytest

from _support.deployments import API_KEY
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.errors import DeploymentError, DeploymentHTTPError, HotloadRefusedError

pytestmark = pytest.mark.timeout(300)


def test_create_or_get_is_idempotent_and_visible_from_another_manager(
    manager, deployment, registry_dir, snapshots
):
    assert deployment.state == "running" and deployment.url.startswith("http://127.0.0.1:")
    again = manager.create_or_get(
        DeploymentConfig(deployment_id="main", storage=snapshots.storage, snapshot=snapshots.base)
    )
    assert again.pid == deployment.pid and again.url == deployment.url
    other = DeploymentManager(registry_dir=registry_dir, api_key=API_KEY, stop_on_exit=False)
    info = other.get("main")
    assert info is not None and info.state == "running" and info.url == deployment.url
    ready = other.wait_for_ready("main", timeout_s=60, poll_interval_s=0.2)
    assert ready.deployment_id == "main" and ready.url == deployment.url  # the SDK's return type
    # Both managers see the same deployment serving one of the snapshots.
    theirs = other.hotload_check_status("main")["replicas"]
    mine = manager.hotload_check_status("main")["replicas"]
    assert [r["current_snapshot_identity"] for r in theirs] == [
        r["current_snapshot_identity"] for r in mine
    ]
    known = {snapshots.base, snapshots.base2, *snapshots.deltas}
    assert mine[0]["current_snapshot_identity"] in known
    other.close()


def test_hotload_base_then_deltas_and_the_ledger(manager, deployment, snapshots):
    for identity in snapshots.deltas:
        assert manager.hotload_and_wait(
            "main", "tiny", identity, snapshots.metadata(identity), timeout_seconds=120
        ) is True  # fmt: skip
        result = manager.last_hotload_result
        assert result.identity == identity and result.pause_s is not None
        assert result.status["replicas"][0]["current_snapshot_identity"] == identity
        assert manager.last_hotload_error is None
    entries = manager.ledger("main")
    assert [e["identity"] for e in entries][-2:] == snapshots.deltas
    assert all(e["replica_id"] is not None for e in entries)
    # Sending the served identity again is a no-op, never a second application.
    assert manager.hotload_and_wait(
        "main", "tiny", snapshots.deltas[-1], snapshots.metadata(snapshots.deltas[-1])
    ), manager.last_hotload_error_message
    assert len(manager.ledger("main")) == len(entries)


def test_refusals_carry_the_servers_reason(manager, deployment, snapshots):
    with pytest.raises(HotloadRefusedError, match=r"no-such-snapshot.*HTTP 404"):
        manager.hotload("main", "tiny", "no-such-snapshot")
    # A delta whose parent is not what the deployment serves: 409, and it keeps serving.
    served = manager.hotload_check_status("main")["replicas"][0]["current_snapshot_identity"]
    wrong = snapshots.deltas[0]
    if served == snapshots.deltas[0]:
        wrong = snapshots.deltas[1]
    metadata = snapshots.metadata(wrong)
    metadata["previous_snapshot_identity"] = "someone-else"
    with pytest.raises(HotloadRefusedError, match="HTTP 409"):
        manager.hotload("main", "tiny", wrong, metadata)
    assert (
        manager.hotload_check_status("main")["replicas"][0]["current_snapshot_identity"] == served
    )


def test_ledger_reset_then_only_a_base_is_accepted(manager, deployment, snapshots):
    assert manager.hotload_and_wait("main", "tiny", snapshots.base, timeout_seconds=120), (
        manager.last_hotload_error_message
    )
    manager.reset_ledger("main")
    delta = snapshots.deltas[0]  # its parent is served, but the ledger was reset
    with pytest.raises(HotloadRefusedError, match="HTTP 409"):
        manager.hotload("main", "tiny", delta, snapshots.metadata(delta))
    assert manager.hotload_and_wait("main", "tiny", snapshots.base2, timeout_seconds=120)
    assert manager.last_hotload_result.identity == snapshots.base2
    assert [e["identity"] for e in manager.ledger("main")] == [snapshots.base2]


def test_http_errors_name_method_url_status_and_message(deployment, registry_dir):
    keyless = DeploymentManager(registry_dir=registry_dir, stop_on_exit=False)
    with pytest.raises(DeploymentHTTPError) as info:
        keyless.hotload_check_status("main")
    error = info.value
    assert error.method == "GET" and error.status_code == 401
    assert error.url == deployment.url + "/hot_load/v1/models/hot_load"
    assert error.message and error.message in str(error)
    keyless.close()


def test_scale_to_zero_restart_recovers_then_delete(manager, snapshots):
    config = DeploymentConfig(
        deployment_id="lifecycle", storage=snapshots.storage, snapshot=snapshots.base
    )
    first = manager.create_or_get(config)
    delta = snapshots.deltas[0]
    assert manager.hotload_and_wait("lifecycle", "", delta, snapshots.metadata(delta)), (
        manager.last_hotload_error_message
    )
    assert manager.scale_to_zero("lifecycle") is True
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == "zombie"
    assert manager.get("lifecycle").state == "stopped"
    with pytest.raises(DeploymentError, match="not running"):
        manager.hotload_check_status("lifecycle")

    second = manager.create_or_get(config)  # same id: restarts with its ledger
    assert second.pid != first.pid
    [replica] = manager.hotload_check_status("lifecycle")["replicas"]
    assert replica["current_snapshot_identity"] == delta
    assert replica["recovered_from_ledger"] is True

    assert manager.delete("lifecycle") is True
    assert manager.get("lifecycle") is None
    assert not psutil.pid_exists(second.pid) or psutil.Process(second.pid).status() == "zombie"


def test_two_replicas_are_ready_only_together(manager, snapshots):
    config = DeploymentConfig(
        deployment_id="pair", storage=snapshots.storage, snapshot=snapshots.base, replicas=2
    )
    manager.create_or_get(config)
    try:
        delta = snapshots.deltas[0]
        assert manager.hotload_and_wait("pair", "", delta, snapshots.metadata(delta)) is True
        replicas = manager.last_hotload_result.status["replicas"]
        assert len(replicas) == 2
        assert {r["current_snapshot_identity"] for r in replicas} == {delta}
        assert all(r["readiness"] for r in replicas)
        assert manager.warmup("pair", max_retries=3, retry_interval_s=0.1) is True
    finally:
        manager.delete("pair")
