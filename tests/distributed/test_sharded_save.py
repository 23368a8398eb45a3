"""Sharded trainers: 2 real ranks (gloo on CPU) each save their own shard of every snapshot.

Each test launches `sharded_worker.py` on 2 ranks (torchrun, or two plain processes
where the test must watch one rank die), then checks what they wrote from here: the
weights a real replica serves after hot-loading base + 3 deltas, `materialize`, and
the per-tensor checksums of a single-process save of the same weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from _support.bits import same_bits
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.snapshot import Manifest, SnapshotStore, write_base, write_delta
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir

WORKER = Path(__file__).with_name("sharded_worker.py")
BIN = Path(sys.executable).parent
# One run of the worker takes ~25 s on the 2-core CI machine; a stuck one is killed.
RUN_TIMEOUT_S = 240
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, ranks: int = 2
) -> list[dict[str, Any]]:
    """Run the worker on `ranks` ranks with torchrun; return each rank's result."""
    out = tmp_path / "out"
    done = subprocess.run(
        torchrun_cmd(tmp_path, *args, ranks=ranks),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def torchrun_cmd(tmp_path: Path, *args: str, ranks: int = 2) -> list[str]:
    """The torchrun command line of the worker on `ranks` ranks (creates `<tmp>/out`)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(WORKER),
        "--storage",
        str(tmp_path / "store"),
        "--out",
        str(out),
        *args,
    ]


def full_weights(out: Path, k: int, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The whole exported weights of save `k` (gathered by the worker), tied copies dropped."""
    full = load_file(str(out / f"full-{k}.safetensors"))
    assert set(manifest.tensors) <= set(full)
    assert set(full) - set(manifest.tensors) <= {"lm_head.weight"}  # tied to the embedding
    return {n: full[n] for n in manifest.tensors}


def check_chain(tmp_path: Path, results: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Both ranks agree; each snapshot materializes to the full weights and has the
    per-tensor checksums (and changed counts) of a single-process save of them."""
    assert all(r["saves"] == results[0]["saves"] for r in results)
    assert all(r["session_id"] == results[0]["session_id"] for r in results)
    store = SnapshotStore(tmp_path / "store")
    single = tmp_path / "single"
    parent: Manifest | None = None
    old: dict[str, torch.Tensor] = {}
    weights = []
    for k, save in enumerate(results[0]["saves"]):
        manifest = store.read_manifest(save["identity"])
        assert manifest.kind == ("base" if k == 0 else "delta")
        assert manifest.stats["num_ranks"] == len(results)
        full = full_weights(tmp_path / "out", k, manifest)
        rebuilt = store.materialize(save["identity"])
        assert all(same_bits(rebuilt[n], t) for n, t in full.items())
        config = json.loads(store.read_file(manifest, "config.json"))
        if parent is None:
            reference = write_base(single, f"s{k}", full, config=config)
        else:
            reference = write_delta(
                single,
                f"s{k}",
                parent=parent,
                old=old,
                new=full,
                compression_format=manifest.compression_format or "",
            )
        for name, entry in reference.tensors.items():
            assert manifest.tensors[name].checksum == entry.checksum, name
            assert manifest.tensors[name].num_changed == entry.num_changed, name
        parent, old = reference, full
        weights.append(full)
    return weights


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_fsdp2_ranks_save_their_shards_and_a_replica_serves_the_whole_model(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    results = torchrun(tmp_path, "--mode", "fsdp", "--tokenizer", str(tokenizer_dir), "--resume")
    weights = check_chain(tmp_path, results)
    store = SnapshotStore(tmp_path / "store")
    saves = [s["identity"] for s in results[0]["saves"]]
    base = store.read_manifest(saves[0])
    # Every parameter is a Shard(0) DTensor: every tensor is in pieces, one per rank
    # that holds rows of it; each rank wrote its own files.
    assert base.format_version == 2
    assert all(e.pieces for e in base.tensors.values())
    embed = base.tensors["model.embed_tokens.weight"]
    assert [p.offset for p in embed.pieces] == [(0, 0), (64, 0)]
    assert {p.file.split(".")[1] for p in embed.pieces} == {"r00000", "r00001"}
    # Resume state stays DCP, sharded: the next step's loss is the same after a reload.
    assert results[0]["loss_after_resume"] == results[0]["loss_after_save"]
    assert results[1]["loss_after_resume"] == results[1]["loss_after_save"]

    config = ReplicaConfig(
        storage=str(tmp_path / "store"), snapshot=saves[0], state_dir=tmp_path / "state"
    )
    replica = Replica(config)
    replica.start()
    server = ServerThread(create_app(replica))
    url = server.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            live = replica.engine.named_weights()
            assert all(same_bits(live[n], t) for n, t in weights[0].items())
            for k in range(1, len(saves)):
                answer = client.post(
                    "/hot_load/v1/models/hot_load",
                    json={
                        "identity": saves[k],
                        "incremental_snapshot_metadata": {
                            "previous_snapshot_identity": saves[k - 1]
                        },
                    },
                )
                assert answer.status_code == 200, answer.text
                status = wait_loaded(client, saves[k])
                assert status["loading_state"]["stage"] == "ready", status
                assert status["current_snapshot_identity"] == saves[k]
                live = replica.engine.named_weights()
                assert all(same_bits(live[n], t) for n, t in weights[k].items())
    finally:
        server.stop()


def test_tensor_parallel_shard1_and_replicated_tensors(tmp_path: Path) -> None:
    results = torchrun(tmp_path, "--mode", "shard1", env={"WS_CODEC": "wsdelta1"})
    check_chain(tmp_path, results)
    store = SnapshotStore(tmp_path / "store")
    head = store.read_manifest(results[0]["saves"][-1]["identity"])
    assert head.compression_format == "wsdelta1"
    proj = head.tensors["model.layers.0.mlp.up_proj.weight"]  # [64, 32]: columns split
    assert [(p.offset, p.shape) for p in proj.pieces] == [((0, 0), (64, 16)), ((0, 16), (64, 16))]
    # 1-D weights are plain tensors on both ranks: written whole, by one rank.
    norm = head.tensors["model.norm.weight"]
    assert norm.pieces == () and norm.file == "model-00000.safetensors"
    # Nothing in the library gathers the whole model, not even on request.
    assert all("not available under a sharded trainer" in r["exported_weights"] for r in results)


def test_a_2d_mesh_with_a_replicated_mesh_dimension(tmp_path: Path) -> None:
    """4 ranks on a 2x2 mesh: 2-D weights in 4 boxes; 1-D weights in 2 boxes, each written
    by the first of the 2 ranks that hold it (never twice)."""
    results = torchrun(tmp_path, "--mode", "mesh2d", "--deltas", "2", ranks=4)
    check_chain(tmp_path, results)
    head = SnapshotStore(tmp_path / "store").read_manifest(results[0]["saves"][-1]["identity"])
    proj = head.tensors["model.layers.0.mlp.up_proj.weight"]  # [64, 32]
    assert [(p.offset, p.shape, p.file.split(".")[1]) for p in proj.pieces] == [
        ((0, 0), (32, 16), "r00000"),
        ((0, 16), (32, 16), "r00001"),
        ((32, 0), (32, 16), "r00002"),
        ((32, 16), (32, 16), "r00003"),
    ]
    norm = head.tensors["model.norm.weight"]  # [32]: rows split over mesh dim 0 only
    assert [(p.offset, p.file.split(".")[1]) for p in norm.pieces] == [
        ((0,), "r00000"),
        ((16,), "r00002"),
    ]


def test_a_rank_whose_write_fails_is_named_by_every_rank_and_the_chain_stays(
    tmp_path: Path,
) -> None:
    """Rank 1's first write of `step1` raises; both ranks raise at once, then save again."""
    results = torchrun(tmp_path, "--mode", "fsdp", "--fail-rank", "1", "--deltas", "2")
    errors = [r["error"] for r in results]
    assert errors[1]["type"] == "StorageError"
    assert "No space left on device (injected)" in errors[1]["message"]
    assert errors[0]["type"] == "DistributedSaveError"
    assert "rank 1: StorageError" not in errors[0]["message"]  # the raw cause, not the wrapper
    assert "rank 1: OSError" in errors[0]["message"], errors[0]["message"]
    # Nothing was published and both ranks still chain onto the base.
    base = results[0]["saves"][0]["identity"]
    assert [e["last_snapshot"] for e in errors] == [base, base]
    # The same save, made again, succeeds on both ranks and is whole and exact.
    check_chain(tmp_path, results)
    assert [s["kind"] for s in results[0]["saves"]] == ["base", "delta", "delta"]


def test_a_rank_killed_mid_save_leaves_no_snapshot_and_the_other_names_it(
    tmp_path: Path,
) -> None:
    """Rank 1 SIGKILLs itself once its part of `step1` is durable; rank 0 must raise."""
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    timeout_s = 6.0
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, str(WORKER), "--storage", str(tmp_path / "store")]
        cmd += ["--out", str(out), "--kill-rank", "1", "--timeout", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
    assert codes[1] == -9, procs[1].stderr.read() if procs[1].stderr else ""  # SIGKILL
    assert codes[0] == 0, procs[0].stderr.read() if procs[0].stderr else ""
    result = json.loads((out / "rank0.json").read_text())
    assert [s["kind"] for s in result["saves"]] == ["base"]
    error = result["error"]
    assert error["type"] == "DistributedSaveError"
    assert "rank 1 did not report" in error["message"], error["message"]
    assert "step1-" in error["message"]
    store = SnapshotStore(tmp_path / "store")
    session = result["session_id"]
    assert store.list_snapshots() == [f"base-{session}"]
    assert not (tmp_path / "store" / f"step1-{session}" / "weightsync.json").exists()


def wait_loaded(client: httpx.Client, identity: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
        state = status["loading_state"]
        if state["target_snapshot_identity"] == identity and state["stage"] in ("ready", "error"):
            return dict(status)
        assert time.monotonic() < deadline, f"load of {identity} did not finish: {status}"
        time.sleep(0.02)


def test_a_weight_syncer_on_every_rank_with_only_rank_0_talking_to_the_deployment(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """Every rank calls `save_and_hotload` on the same `WeightSyncer`; only rank 0's has
    a deployment. After each sync the served weights are the full model's, bit for bit.
    Every rank passes `check_deployment_before_save=True`; rank 1, which cannot ask, takes
    rank 0's checkpoint type each time (its own rule would make every save a base).
    Before the last sync the deployment is rolled back to the base (from here): rank 0
    sees it and chooses a base, which rank 1 saves with it."""
    base_dir = save_model_dir(
        build_model("tiny", seed=0, initializer_range=0.2),
        tmp_path / "tiny-base",
        tokenizer_dir=tokenizer_dir,
    )
    (tmp_path / "store").mkdir()
    config = ReplicaConfig(
        storage=str(tmp_path / "store"),
        model_dir=base_dir,
        state_dir=tmp_path / "state",
        model_name="tiny",
        deployment_id="sharded",
    )
    replica = Replica(config)
    replica.start()
    server = ServerThread(create_app(replica))
    url = server.start()
    out = tmp_path / "out"
    args = ["--mode", "fsdp", "--deltas", "3", "--tokenizer", str(tokenizer_dir)]
    cmd = torchrun_cmd(tmp_path, *args, "--sync-url", url, "--check-deployment")
    store = SnapshotStore(tmp_path / "store")
    log = (tmp_path / "torchrun.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    served: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for k in range(4):
                identity = wait_synced(proc, out, k, tmp_path / "torchrun.log")
                status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
                assert status["current_snapshot_identity"] == identity, status
                full = full_weights(out, k, store.read_manifest(identity))
                live = replica.engine.named_weights()
                assert all(same_bits(live[n], t) for n, t in full.items()), k
                served.append(identity)
                if k == 2:  # roll the deployment back: the next delta could not apply
                    answer = client.post(
                        "/hot_load/v1/models/hot_load", json={"identity": served[0]}
                    )
                    assert answer.status_code == 200, answer.text
                    assert wait_loaded(client, served[0])["loading_state"]["stage"] == "ready"
                (out / f"checked-{k}").write_text("ok")
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "torchrun.log").read_text()[
            -4000:
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        server.stop()
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("crash" not in r for r in results), results
    assert all("not supported under a sharded trainer" in r["recover_with_base"] for r in results)
    # Every rank's syncer returned the identity rank 0's loaded; rank 0 chose the last base.
    assert [[s["identity"] for s in r["saves"]] for r in results] == [served, served]
    kinds = [store.read_manifest(i).kind for i in served]
    assert kinds == ["base", "delta", "delta", "base"]
    assert [s["timing"]["checkpoint_type"] for s in results[1]["saves"]] == kinds
    # The SDK's timing keys: every phase on rank 0; rank 1 only saved.
    sdk_keys = {"save_time_s", "hotload_time_s", "warmup_time_s", "total_time_s"}
    for save in results[0]["saves"]:
        assert sdk_keys <= set(save["timing"]), save
        assert save["timing"]["warmed_up"] is True
    for save in results[1]["saves"]:
        assert {"save_time_s", "total_time_s"} <= set(save["timing"])
        assert "hotload_time_s" not in save["timing"]
    # Per-tensor checksums equal to a single-process save of the same weights.
    chain = [
        {"session_id": r["session_id"], "saves": [{"identity": i} for i in served[:3]]}
        for r in results
    ]
    check_chain(tmp_path, chain)
    last = store.read_manifest(served[3])
    config_doc = json.loads(store.read_file(last, "config.json"))
    full = full_weights(out, 3, last)
    reference = write_base(tmp_path / "single-last", "s3", full, config=config_doc)
    assert {n: e.checksum for n, e in reference.tensors.items()} == {
        n: e.checksum for n, e in last.tensors.items()
    }


def wait_synced(proc: subprocess.Popen[bytes], out: Path, k: int, log: Path) -> str:
    """The identity rank 0 reports synced as its `k`th save (the worker's handshake)."""
    marker = out / f"synced-{k}"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, f"the ranks exited before sync {k}: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"sync {k} did not happen within {RUN_TIMEOUT_S} s"
        time.sleep(0.05)
    return marker.read_text()  # renamed into place whole by the worker
