"""The trainer killed (SIGKILL) between saving a snapshot and signalling the deployment; a new
`TrainingClient` resumes from the DCP state and syncs to the same deployment. The deployment
serves the last verified snapshot throughout, and the resumed run reproduces the lost step."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _support.fault_rig import START_IDENTITY, Rig
from weightsync import WeightSyncer
from weightsync.deployment import DeploymentManager
from weightsync.snapshot import SnapshotStore
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient

pytestmark = pytest.mark.timeout(180)

IDS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]]


def adamw_step(client: TrainingClient) -> None:
    """One optimizer step; the trainer that dies runs this very source too."""
    ids = torch.tensor(IDS)
    client.optimizer.zero_grad()
    client.model(input_ids=ids, labels=ids).loss.backward()
    client.optimizer.step()


TRAINER = f"""
import json, sys, time, torch
from weightsync import WeightSyncer
from weightsync.deployment import DeploymentManager
from weightsync.toymodel import build_model
from weightsync.trainer import TrainingClient
torch.set_num_threads(1)
IDS = {IDS!r}
{inspect.getsource(adamw_step).replace("client: TrainingClient", "client").replace(" -> None", "")}
store, tok, url = sys.argv[1:4]
model = build_model("tiny", seed=0)
client = TrainingClient(model, storage=store, tokenizer_dir=tok)
client.optimizer = torch.optim.AdamW(client.model.parameters(), lr=1e-2)
syncer = WeightSyncer(policy_client=client, deploy_mgr=DeploymentManager(base_url=url),
                      deployment_id="shared", warmup_retry_interval_s=0.05,
                      hotload_poll_interval_s=0.02)
adamw_step(client)
loaded = syncer.save_and_hotload("step-0")
client.save_state("ckpt-0")
adamw_step(client)
saved = syncer.save_only("step-1")  # saved ... and the signal never comes
print(json.dumps({{"loaded": loaded, "saved": saved, "session": client.session_id}}), flush=True)
time.sleep(600)
"""


def _adamw_client(store: Path, tok: Path) -> TrainingClient:
    client = TrainingClient(build_model("tiny", seed=0), storage=str(store), tokenizer_dir=tok)
    client.optimizer = torch.optim.AdamW(client.model.parameters(), lr=1e-2)
    return client


def _bits(weights: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {n: t.view(torch.int16).flatten().tolist() for n, t in weights.items()}


def test_trainer_killed_between_save_and_signal_then_resumed(faults_rig: Rig) -> None:
    rig = faults_rig
    rig.start_replica()
    store = rig.root / "store"
    script = rig.root / "trainer.py"
    script.write_text(textwrap.dedent(TRAINER))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), str(rig.tokenizer_dir), rig.url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, "the trainer died before saving"
        report = json.loads(line)
        os.kill(proc.pid, signal.SIGKILL)  # between save and signal
    finally:
        proc.kill()
        proc.wait(30)
    loaded, orphan = report["loaded"], report["saved"]
    assert orphan == f"step-1-{report['session']}"
    snapshots = SnapshotStore(store)
    rig.references[loaded] = snapshots.materialize(loaded)
    rig.configs[loaded] = snapshots.read_config(loaded)
    obs = rig.observe(
        "trainer killed between save and signal", "deployment keeps its last verified load",
        f"killed after save_only -> {orphan!r}", allowed={loaded},
    )  # fmt: skip
    assert obs.ledger_ok == [START_IDENTITY, loaded]
    assert snapshots.verify(orphan).ok  # the orphan is complete, just never loaded

    # A new trainer resumes from the dead one's DCP state and syncs to the same deployment.
    client = _adamw_client(store, rig.tokenizer_dir)
    client.load_state_with_optimizer("ckpt-0")
    assert _bits(client.exported_weights()) == _bits(rig.references[loaded])
    adamw_step(client)
    mgr = DeploymentManager(base_url=rig.url)
    rig.stack.callback(mgr.close)
    syncer = WeightSyncer(
        policy_client=client, deploy_mgr=mgr, deployment_id="shared",
        warmup_retry_interval_s=0.05, hotload_poll_interval_s=0.02,
    )  # fmt: skip
    resumed = syncer.save_and_hotload("step-1")
    assert resumed == f"step-1-{client.session_id}" and resumed != orphan
    assert syncer.last_timing is not None and syncer.last_timing.checkpoint_type == "base"
    rig.remember(client, resumed)
    obs = rig.observe(
        "new TrainingClient resumed from DCP, synced", "its first sync (a base) loads",
        resumed, allowed={resumed},
    )  # fmt: skip
    # Nothing lost: the resumed step equals the step the dead trainer saved, bit for bit.
    assert _bits(rig.references[resumed]) == _bits(snapshots.materialize(orphan))
