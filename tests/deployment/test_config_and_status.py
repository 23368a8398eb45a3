"""DeploymentConfig validation, hot-load status classification, unreachable deployments."""

from __future__ import annotations

import socket

import pytest

from weightsync.deployment import DeploymentConfig, DeploymentManager, RetryPolicy
from weightsync.deployment.manager import describe_status, hotload_outcome, reported_pause_s
from weightsync.errors import DeploymentError, InvalidIdentityError, InvalidInputError


def _replica(rid, current, ready=True, stage="ready", target=None, error=None, adapters=()):
    state = {"stage": stage, "target_snapshot_identity": target}
    if error:
        state["error"] = error
    return {
        "replica_id": f"replica-{rid}",
        "current_snapshot_identity": current,
        "readiness": ready,
        "loading_state": state,
        "loaded_adapters": [{"identity": a, "status": "loaded"} for a in adapters],
    }


def _load(identity, *, pause_s):
    return {"identity": identity, "kind": "delta", "result": "ok", "pause_s": pause_s}


def test_config_needs_exactly_one_source_of_weights(tmp_path):
    with pytest.raises(InvalidInputError, match="exactly one of snapshot"):
        DeploymentConfig(deployment_id="d", storage=str(tmp_path))
    with pytest.raises(InvalidInputError, match="exactly one of snapshot"):
        DeploymentConfig(deployment_id="d", storage=str(tmp_path), snapshot="a", model_dir="b")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("replicas", 0, "replicas must be >= 1"),
        ("transition", "eventually", "transition must be"),
        ("engine", "tensorrt", "engine must be"),
        ("port", 70000, "port must be in"),
        ("ray_drain_timeout_s", 5.0, "needs ray_address"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        DeploymentConfig(deployment_id="d", storage=str(tmp_path), snapshot="s", **{field: value})


def test_config_rejects_a_deployment_id_that_escapes_the_registry(tmp_path):
    with pytest.raises(InvalidIdentityError):
        DeploymentConfig(deployment_id="../x", storage=str(tmp_path), snapshot="s")


def test_serve_args_name_the_snapshot_and_never_the_api_key(tmp_path):
    config = DeploymentConfig(
        deployment_id="d", storage="/s", snapshot="base-1", api_key="sekret", replicas=2
    )
    args = config.serve_args(state_dir=tmp_path / "st", ready_file=tmp_path / "r.json")
    assert args[:5] == ["serve", "--storage", "/s", "--snapshot", "base-1"]
    assert args[args.index("--replicas") + 1] == "2"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert "sekret" not in " ".join(args)


def test_outcome_ready_only_when_every_replica_serves_the_identity():
    one_behind = {"replicas": [_replica(0, "b"), _replica(1, "a", stage="decoding", target="b")]}
    assert hotload_outcome(one_behind, "b")[0] == "pending"
    both = {"replicas": [_replica(0, "b"), _replica(1, "b")]}
    assert hotload_outcome(both, "b") == ("ready", "")
    not_ready = {"replicas": [_replica(0, "b", ready=False)]}
    assert hotload_outcome(not_ready, "b")[0] == "pending"
    assert hotload_outcome({"replicas": []}, "b")[0] == "pending"


def test_outcome_error_only_for_this_target_stale_errors_ignored():
    stale = {"replicas": [_replica(0, "a", stage="error", target="old", error="bad")]}
    assert hotload_outcome(stale, "new")[0] == "pending"
    failed = {"replicas": [_replica(0, "a", stage="error", target="new", error="checksum")]}
    outcome, detail = hotload_outcome(failed, "new")
    assert outcome == "error" and "checksum" in detail and "replica-0" in detail


def test_outcome_counts_a_loaded_adapter_as_serving_it():
    status = {"replicas": [_replica(0, "base", adapters=["lora-2"])]}
    assert hotload_outcome(status, "lora-2")[0] == "ready"
    assert hotload_outcome(status, "lora-3")[0] == "pending"


def test_a_status_outside_the_wire_contract_is_named():
    broken = _replica(0, "a")
    broken["readiness"] = "maybe"
    with pytest.raises(DeploymentError, match=r"not the wire contract's.*replicas\.0\.readiness"):
        hotload_outcome({"replicas": [broken]}, "a")


def test_describe_status_and_reported_pause():
    status = {
        "replicas": [
            {**_replica(0, "a"), "last_load": _load("a", pause_s=0.01)},
            {**_replica(1, "a"), "last_load": _load("a", pause_s=0.03)},
        ]
    }
    assert reported_pause_s(status, "a") == pytest.approx(0.03)
    assert reported_pause_s(status, "other") is None
    assert "replica-1: serving 'a'" in describe_status(status)


def test_retry_policy_backs_off_and_validates():
    policy = RetryPolicy(max_retries=3, backoff_s=0.1, max_backoff_s=0.3)
    assert [policy.delay_s(i) for i in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(InvalidInputError):
        RetryPolicy(max_retries=-1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_unreachable_deployment_is_retried_then_named(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    mgr = DeploymentManager(
        base_url=url, registry_dir=tmp_path, retry=RetryPolicy(max_retries=2, backoff_s=0.01)
    )
    with pytest.raises(DeploymentError, match=r"after 3 attempt\(s\)") as info:
        mgr.hotload_check_status("remote")
    assert url in str(info.value)
    assert mgr.warmup("m", max_retries=2, retry_interval_s=0.01) is False
    mgr.close()


def test_manager_without_an_address_says_so(tmp_path):
    mgr = DeploymentManager(registry_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="no address for deployment 'nowhere'"):
        mgr.hotload_check_status("nowhere")
    assert mgr.get("nowhere") is None
    assert mgr.delete("nowhere") is False
    with pytest.raises(DeploymentError, match="no local deployment 'nowhere'"):
        mgr.scale_to_zero("nowhere")
    mgr.close()
