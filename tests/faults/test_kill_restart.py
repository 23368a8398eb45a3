"""A replica process killed (SIGKILL) during fetch, decode or swap, then restarted with the
same state dir: it serves its last verified snapshot, and the trainer's syncer recovers.

Fetch is held from outside the process: the snapshot's shard is replaced by a named pipe,
so the replica's read blocks until it is killed. Decode and swap run in-process on bytes
already fetched, which no outside seam reaches, so those cases hold the load with the
`WEIGHTSYNC_FAULT_STALL=<stage>:<seconds>` hook of `weightsync serve` (it only sleeps).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from _support.fault_rig import Rig, train_step
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.server.stage_hooks import STALL_ENV

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _wait_stage(rig: Rig, identity: str, stage: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = rig.status()["loading_state"]
        if state["target_snapshot_identity"] == identity and state["stage"] == stage:
            return
        assert time.monotonic() < deadline, f"never reached {stage}: {state}"
        time.sleep(0.01)


def _kill(mgr: DeploymentManager, deployment_id: str) -> None:
    info = mgr.get(deployment_id)
    assert info is not None and info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    os.waitpid(info.pid, 0)  # reap it: the test process spawned it


@pytest.mark.parametrize("stage", ["fetching", "decoding", "swapping", "checking"])
def test_replica_killed_mid_load_recovers_last_verified(
    faults_rig, tmp_path, monkeypatch, stage
) -> None:
    rig = faults_rig
    mgr = DeploymentManager(registry_dir=tmp_path / "registry")
    rig.stack.callback(mgr.close)
    rig.stack.callback(lambda: mgr.delete("victim"))
    client, syncer = rig.trainer(mgr=mgr, deployment_id="victim", recover_with_base=False)
    train_step(client, seed=1)
    start = rig.save(client, syncer, "step-0", checkpoint_type="base")
    config = DeploymentConfig(
        deployment_id="victim", storage=str(rig.root / "store"), snapshot=start,
        state_dir=str(tmp_path / "state"), startup_timeout_s=120,
        extra_args=("--engine-threads", "1"),
    )  # fmt: skip
    if stage != "fetching":
        monkeypatch.setenv(STALL_ENV, f"{stage}:120")
    rig.attach(mgr.create_or_get(config).url or "")
    train_step(client, seed=2)
    target = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    held = None
    if stage == "fetching":  # the read of this shard blocks until a writer opens the pipe
        held = sorted((rig.root / "store" / target).glob("model-*.safetensors"))[0]
        data = held.read_bytes()
        held.unlink()
        os.mkfifo(held)
    result: dict[str, object] = {}
    loader = threading.Thread(target=lambda: result.setdefault("ok", syncer.hotload(target)))
    loader.start()
    _wait_stage(rig, target, stage)
    _kill(mgr, "victim")
    loader.join(60)
    assert result == {"ok": False}  # the syncer saw the deployment go away
    if held is not None:
        held.unlink()
        held.write_bytes(data)
    monkeypatch.delenv(STALL_ENV, raising=False)

    rig.attach(mgr.create_or_get(config).url or "")  # same command, same state dir
    status = rig.status()
    assert status["recovered_from_ledger"] is True
    obs = rig.observe(
        f"replica killed during {stage}, restarted", "serves its last verified snapshot",
        f"hotload() -> {result['ok']}", allowed={start},
    )  # fmt: skip
    assert obs.ledger_last["identity"] == start and target not in obs.ledger_ok
    # The trainer goes on: its next sync loads (a base: the interrupted delta's chain is
    # not what the deployment serves).
    train_step(client, seed=3)
    outcome = rig.sync(client, syncer, "step-2")
    assert outcome == f"step-2-{client.session_id}", outcome
    assert syncer.last_timing is not None and syncer.last_timing.checkpoint_type == "base"
    rig.observe(f"after the kill during {stage}: next sync", "loads", outcome, allowed={outcome})


def test_stall_hook_from_env_parses_and_refuses_bad_values() -> None:
    from weightsync.errors import InvalidInputError
    from weightsync.server.stage_hooks import stall_hook_from_env

    assert stall_hook_from_env({}) is None
    hook = stall_hook_from_env({STALL_ENV: "decoding:0.2"})
    assert hook is not None
    started = time.monotonic()
    hook("fetching", "x-1")  # another stage: no stall
    assert time.monotonic() - started < 0.2
    hook("decoding", "x-1")
    assert time.monotonic() - started >= 0.2
    for bad in ("decoding", "decoding:soon", "ready:1", "fetching:-1"):
        with pytest.raises(InvalidInputError):
            stall_hook_from_env({STALL_ENV: bad})
