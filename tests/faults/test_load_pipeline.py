"""The load pipeline ends in a defined state, and recovery never serves unverified weights.

Faults at the seams: another process holding the ledger's SQLite file locked, a
ledger whose journal cannot be created (a directory in its place: an unwritable
state dir that stays unwritable for root, unlike a chmod), files edited in the
storage directory, snapshots deleted from it, a damaged ledger page — never a
patched internal.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _support.fault_rig import START_IDENTITY, Observation, Rig, describe, record, train_step
from weightsync.errors import DeploymentError, LedgerError, WeightSyncError
from weightsync.server.config import ReplicaConfig
from weightsync.server.ledger import LEDGER_FILE
from weightsync.server.replica import Replica
from weightsync.toymodel import build_model, save_model_dir

pytestmark = pytest.mark.timeout(180)

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def _lock_ledger(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holds the ledger file exclusively locked for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _metrics_ready(rig: Rig) -> float:
    for line in rig.http.get("/metrics").text.splitlines():
        if line.startswith("weightsync_replica_ready"):
            return float(line.split()[-1])
    raise AssertionError("no weightsync_replica_ready in /metrics")


def _live_checksums(rig: Rig) -> dict[str, str]:
    from _support.fault_rig import CHECKSUM

    answer = rig.http.get("/hot_load/v1/weights", params={"checksum_format": CHECKSUM}).json()
    return dict(answer["replicas"][0]["checksums"])


def _record_degraded(rig: Rig, case: str, expected: str, outcome: Any) -> dict[str, Any]:
    """Observe a degraded replica: serving verified weights the ledger does not name yet."""
    from _support.fault_rig import checksums

    status = rig.wait_idle()
    served = status["current_snapshot_identity"]
    assert _live_checksums(rig) == checksums(rig.references[served]), "unverified weights"
    record(Observation.of(case, expected, outcome, status, rig.ledger()))
    return status


def _synced(rig: Rig, **replica: Any) -> tuple[Any, Any, str]:
    rig.start_replica(**replica)
    client, syncer = rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    base = rig.sync(client, syncer, "step-0")
    assert isinstance(base, str), base
    return client, syncer, base


@pytest.mark.parametrize("fault", ["locked by another process", "journal cannot be created"])
def test_ledger_unwritable_during_a_load_ends_in_error_degraded_then_recovers(
    faults_rig: Rig, fault: str
) -> None:
    rig = faults_rig
    client, syncer, base = _synced(rig)
    ledger_path = rig.state_dir / LEDGER_FILE
    train_step(client, seed=2)
    target = f"step-1-{client.session_id}"
    if fault.startswith("locked"):
        blocker: Any = _lock_ledger(ledger_path, 8.0)
    else:
        blocker = Path(f"{ledger_path}-journal")
        blocker.mkdir()
    outcome = rig.sync(client, syncer, "step-1")
    assert isinstance(outcome, WeightSyncError), outcome  # the syncer sees the stage error
    status = rig.wait_idle()
    state = status["loading_state"]
    assert state["stage"] == "error" and "ledger" in state["error"], state
    assert status["current_snapshot_identity"] == target
    assert status["degraded"] and "ledger" in status["degraded"]
    assert status["readiness"] is True and _metrics_ready(rig) == 1.0  # they agree
    unreadable = rig.http.get("/hot_load/v1/ledger")  # a bounded, named refusal, not a hang
    assert unreadable.status_code == 503 and "ledger" in unreadable.text, unreadable.text
    if fault.startswith("locked"):
        blocker.wait(30)
    else:
        blocker.rmdir()
    status = _record_degraded(
        rig,
        f"ledger unwritable during a load ({fault})",
        "load ends in error, degraded; verified new weights served; later loads work",
        outcome,
    )
    assert status["degraded"]  # until the next ledger write succeeds
    # The next load writes the missing row first; the replica is no longer degraded.
    train_step(client, seed=3)
    nxt = rig.sync(client, syncer, "step-2")
    assert isinstance(nxt, str), nxt
    obs = rig.observe(f"after the ledger fault ({fault}): next sync", "loads", nxt, allowed={nxt})
    assert obs.ledger_ok == [START_IDENTITY, base, target, nxt]
    assert rig.status()["degraded"] is None
    reset = rig.http.post("/hot_load/v1/ledger/reset")
    assert reset.status_code == 200, reset.text


def test_ledger_reset_works_while_degraded(faults_rig: Rig) -> None:
    rig = faults_rig
    client, syncer, _ = _synced(rig)
    journal = Path(f"{rig.state_dir / LEDGER_FILE}-journal")
    journal.mkdir()
    train_step(client, seed=2)
    rig.sync(client, syncer, "step-1")
    assert rig.wait_idle()["degraded"]
    assert rig.http.post("/hot_load/v1/ledger/reset").status_code == 503  # still unwritable
    journal.rmdir()
    reset = rig.http.post("/hot_load/v1/ledger/reset")
    assert reset.status_code == 200, reset.text
    status = rig.status()
    assert status["degraded"] is None and status["requires_base"] is True
    assert rig.ledger() == []


def _broken_tokenizer_dir(rig: Rig) -> Path:
    broken = rig.root / "broken-tokenizer"
    shutil.copytree(rig.tokenizer_dir, broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "truncation": nul')
    return broken


def _restart(rig: Rig) -> Replica:
    """A second replica on the same state dir and storage (the restart), started."""
    from _support.fault_rig import start_model_dir

    config = ReplicaConfig(
        storage=str(rig.root / "store"),
        model_dir=start_model_dir(rig.root, rig.tokenizer_dir),
        state_dir=rig.state_dir,
        engine_options={"num_threads": 1},
    )
    replica = Replica(config, storage=rig.faults)
    rig.stack.callback(replica.close)
    replica.start()
    return replica


def test_base_with_a_tokenizer_json_that_is_not_json_is_refused_before_the_swap(
    faults_rig: Rig,
) -> None:
    rig = faults_rig
    _, _, base = _synced(rig)
    rig.tokenizer_dir = _broken_tokenizer_dir(rig)
    client, syncer = rig.trainer(seed=7, recover_with_base=False)
    outcome = rig.sync(client, syncer, "broken", checkpoint_type="base")
    target = f"broken-{client.session_id}"
    assert isinstance(outcome, WeightSyncError), outcome
    obs = rig.observe(
        "a base whose tokenizer.json is not JSON", "refused before the swap; old weights served",
        outcome, allowed={base},
    )  # fmt: skip
    assert obs.stage == "error" and "tokenizer.json" in (obs.error or "")
    assert obs.ledger_last == {"identity": target, "kind": "base", "result": "error",
                               "error": obs.error}  # fmt: skip
    assert _restart(rig).current_identity == base  # restart serves what was served


def test_tampered_tokenizer_with_a_stale_checksum_is_refused(faults_rig: Rig) -> None:
    rig = faults_rig
    client, syncer, base = _synced(rig)
    train_step(client, seed=2)
    target = rig.save(client, syncer, "step-1", checkpoint_type="base")
    path = rig.root / "store" / target / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, other bytes; the manifest is not updated
    path.write_bytes(bytes(data))
    outcome: Any
    try:
        outcome = syncer.hotload(target)
    except WeightSyncError as e:
        outcome = e
    assert outcome is not True, outcome
    obs = rig.observe(
        "a tampered tokenizer.json with a stale manifest checksum",
        "refused before the swap (checksum); old weights served", outcome, allowed={base},
    )  # fmt: skip
    assert obs.stage == "error" and "tokenizer.json" in (obs.error or "")
    assert "checksum" in (obs.error or "")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rms_norm_eps", 1e-3),
        ("rope_parameters", {"rope_theta": 12345.0, "rope_type": "default"}),
        ("eos_token_id", 3),
        ("architectures", ["LlamaForCausalLM"]),
    ],
    ids=["rms_norm_eps", "rope_theta", "eos_token_id", "architectures"],
)
def test_base_with_the_same_shapes_but_another_config_is_refused(
    faults_rig: Rig, key: str, value: Any
) -> None:
    rig = faults_rig
    _, _, base = _synced(rig)
    client, syncer = rig.trainer(seed=9, recover_with_base=False)
    setattr(client.model.config, key, value)
    assert client.model.config.to_dict()[key] == value
    outcome = rig.sync(client, syncer, "other-config", checkpoint_type="base")
    assert isinstance(outcome, WeightSyncError), outcome
    assert key in str(outcome), outcome
    obs = rig.observe(
        f"a base with the same shapes but another config.json ({key})",
        "refused (409) naming the differing keys", outcome, allowed={base},
    )  # fmt: skip
    assert obs.ledger_ok[-1] == base
    assert _restart(rig).current_identity == base


@pytest.mark.parametrize("root_has_model", [False, True], ids=["empty root", "model in root"])
def test_restart_refuses_when_the_ledger_snapshot_was_deleted(
    faults_rig: Rig, root_has_model: bool
) -> None:
    rig = faults_rig
    client, syncer, _ = _synced(rig)
    train_step(client, seed=2)
    last = rig.sync(client, syncer, "step-1")
    assert isinstance(last, str), last
    shutil.rmtree(rig.root / "store" / last)
    if root_has_model:  # a Hugging Face model directory's files in the storage root
        save_model_dir(build_model("tiny", seed=5), rig.root / "store")
    with pytest.raises(DeploymentError, match="not in") as refused:
        _restart(rig)
    assert last in str(refused.value) and "ledger" in str(refused.value)
    where = "model files in the storage root" if root_has_model else "storage root empty"
    record(
        Observation(
            case=f"restart after the ledger's newest ok snapshot was deleted ({where})",
            expected="loud refusal naming the snapshot and the ledger; nothing else served",
            syncer=describe(refused.value), serving=None, stage="(not started)", error=None,
            serves_reference_of=None, ledger_last={"identity": last, "kind": "delta",
                                                   "result": "ok", "error": None},
        )
    )  # fmt: skip


def test_damaged_ledger_is_a_clear_error_naming_the_file(faults_rig: Rig) -> None:
    rig = faults_rig
    _synced(rig)
    rig.replica.ledger.close()  # (the running one keeps no handle that could repair it)
    path = rig.state_dir / LEDGER_FILE
    data = bytearray(path.read_bytes())
    assert len(data) >= 8192
    data[4096:8192] = b"\xa5" * 4096  # the second page (the loads table) overwritten
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError) as damaged:
        _restart(rig)
    message = str(damaged.value)
    assert str(path) in message and "damaged" in message and "move it aside" in message
    record(
        Observation(
            case="a damaged ledger page", expected="clear error naming the file and what to do",
            syncer=describe(damaged.value), serving=None, stage="(not started)", error=None,
            serves_reference_of=None, ledger_last=None,
        )
    )  # fmt: skip


def test_delta_changing_every_element_by_one_ulp_loads_bit_exact(faults_rig: Rig) -> None:
    rig = faults_rig
    client, syncer, _ = _synced(rig)
    with torch.no_grad():  # one bf16 ulp (the exported dtype) up, every element
        for p in client.model.parameters():
            served = p.to(torch.bfloat16)
            p.copy_(torch.nextafter(served, torch.full_like(served, float("inf"))).float())
    outcome = rig.sync(client, syncer, "ulp", checkpoint_type="delta")
    assert isinstance(outcome, str), outcome
    manifest = client.store.read_manifest(outcome)
    assert manifest.stats["num_changed"] == manifest.stats["num_elements"], manifest.stats
    obs = rig.observe(
        "a genuine delta that changes every element by one ulp",
        "loads bit-exact (no undo copy held; memory: docs/reliability.md)", outcome,
        allowed={outcome},
    )  # fmt: skip
    assert obs.ledger_last == {"identity": outcome, "kind": "delta", "result": "ok",
                               "error": None}  # fmt: skip


def _write_adapters(rig: Rig, count: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from weightsync.snapshot import write_lora

    names = []
    for i in range(count):
        model = get_peft_model(
            build_model("tiny", seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        config = model.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        tensors = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        name = f"lora-{i:02d}-0a0a0a0a"
        write_lora(rig.root / "store", name, adapter_tensors=tensors, adapter_config=config)
        names.append(name)
    return names


def _adapters(rig: Rig) -> list[str]:
    """The adapters the replica reports as loaded (the SDK's `{"identity", "status"}` entries)."""
    loaded = rig.status()["loaded_adapters"]
    assert all(a["status"] == "loaded" for a in loaded), loaded
    return [a["identity"] for a in loaded]


def _hot_load_adapter(rig: Rig, name: str) -> None:
    r = rig.http.post("/hot_load/v1/models/hot_load", json={"identity": name})
    assert r.status_code == 200, r.text
    status = rig.wait_idle()
    assert status["loading_state"]["stage"] == "ready", status


def test_forty_lora_syncs_keep_the_limit_least_recently_used_out(faults_rig: Rig) -> None:
    rig = faults_rig
    rig.start_replica(max_adapters=8)
    names = _write_adapters(rig, 40)
    favourite = names[0]
    body = {"prompt": [5, 17, 33], "max_tokens": 1, "temperature": 0}
    for name in names:
        _hot_load_adapter(rig, name)
        # The favourite is used after every load, so it is never the least recently used.
        if favourite in _adapters(rig):
            r = rig.http.post("/v1/completions", json={**body, "model": f"weightsync@{favourite}"})
            assert r.status_code == 200, r.text
    loaded = _adapters(rig)
    assert len(loaded) == 8 and favourite in loaded
    assert set(loaded) == {favourite, *names[-7:]}
    # A request naming an unloaded adapter is refused, never answered by the base weights.
    r = rig.http.post("/v1/completions", json={**body, "model": f"weightsync@{names[1]}"})
    assert r.status_code == 404 and "was unloaded" in r.text, r.text
    restarted = _restart(rig)
    assert sorted(restarted.engine.loaded_adapters()) == sorted(loaded)
    record(
        Observation(
            case="40 LoRA syncs (--max-adapters 8)",
            expected="8 kept (least recently used unloaded); an unloaded one is a 404, not the "
            "base; restart reloads only those",
            syncer=f"loaded {len(loaded)}: the used one + the 7 newest; an unloaded one: 404",
            serving=START_IDENTITY,
            stage="ready", error=None, serves_reference_of=START_IDENTITY,
            ledger_last=None,
        )
    )  # fmt: skip


V0_LEDGER = """
CREATE TABLE loads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, identity TEXT NOT NULL, kind TEXT NOT NULL,
    parent TEXT, source TEXT NOT NULL, result TEXT NOT NULL, error TEXT,
    started_at TEXT NOT NULL, finished_at TEXT NOT NULL, fetch_s REAL NOT NULL DEFAULT 0,
    decode_s REAL NOT NULL DEFAULT 0, verify_s REAL NOT NULL DEFAULT 0,
    drain_s REAL NOT NULL DEFAULT 0, pause_s REAL NOT NULL DEFAULT 0,
    check_s REAL NOT NULL DEFAULT 0, total_s REAL NOT NULL DEFAULT 0,
    bytes_fetched INTEGER NOT NULL DEFAULT 0, reset_prompt_cache TEXT,
    recovered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO loads (identity, kind, parent, source, result, started_at, finished_at, pause_s,
                   bytes_fetched, recovered)
VALUES ('b-1', 'base', NULL, '/store', 'ok', 't0', 't1', 0.25, 123, 1);
"""


def test_a_ledger_written_by_the_previous_schema_still_opens(tmp_path: Path) -> None:
    import sqlite3

    from weightsync.server.ledger import SCHEMA_VERSION, Ledger

    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    conn.executescript(V0_LEDGER)
    conn.close()
    ledger = Ledger(tmp_path)
    [entry] = ledger.entries()
    assert (entry.identity, entry.kind, entry.recovered, entry.seq) == ("b-1", "base", True, 1)
    assert (entry.load.pause_s, entry.load.bytes_fetched, entry.load.source) == (
        0.25, 123, "/store"
    )  # fmt: skip
    ledger.close()
    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_patch_denser_than_its_tensor_is_held_dense(tmp_path: Path) -> None:
    """What the decoding stage holds for a delta: positions + values while that is smaller,
    the tensor's new bits once it is not; applying either gives the same bits."""
    import numpy as np

    from weightsync.codec.bits import bits
    from weightsync.snapshot import SnapshotStore, write_base, write_delta

    gen = torch.Generator().manual_seed(0)
    old = {"dense": torch.randn(64, 64, generator=gen).to(torch.bfloat16),
           "sparse": torch.randn(64, 64, generator=gen).to(torch.bfloat16)}  # fmt: skip
    new = {"dense": torch.nextafter(old["dense"], torch.full_like(old["dense"], 9.0)),
           "sparse": old["sparse"].clone()}  # fmt: skip
    new["sparse"][0, :3] += 1.0
    base = write_base(tmp_path, "b-1", old, config={})
    write_delta(tmp_path, "d-1", parent=base, old=old, new=new)
    fetched = SnapshotStore(tmp_path).fetch("d-1")
    compact = fetched.patches(old, dense_when_smaller=True)
    assert compact["dense"].positions is None and compact["sparse"].positions is not None
    assert fetched.patches(old)["dense"].positions is not None  # the default is unchanged
    for name, patch in compact.items():
        target = old[name].clone()
        patch.apply_(target)
        assert np.array_equal(bits(target), bits(new[name])), name


def test_a_faulty_engine_apply_is_caught_after_the_swap_and_the_old_weights_put_back(
    faults_rig: Rig,
) -> None:
    """The post-swap check: an engine whose in-place apply writes one wrong bit (the seam:
    the engine the replica is given). No undo copy is held; the previous weights are read
    again from their recorded source, verified, and put back."""
    import numpy as np

    from _support.fault_rig import start_model_dir
    from weightsync.codec.bits import bits
    from weightsync.server.app import create_app
    from weightsync.server.engines.torch_engine import TorchEngine
    from weightsync.server.runner import ServerThread

    class OneBitOffEngine(TorchEngine):
        def apply_patches(self, patches: Any, *, keep_undo: bool = True) -> Any:
            undo = super().apply_patches(patches, keep_undo=keep_undo)
            name = sorted(patches)[0]
            view = bits(self.named_weights()[name]).reshape(-1)
            view[0] = np.bitwise_xor(view[0], 1)
            return undo

    rig = faults_rig
    config = ReplicaConfig(
        storage=str(rig.root / "store"), model_dir=start_model_dir(rig.root, rig.tokenizer_dir),
        state_dir=rig.state_dir,
    )  # fmt: skip
    replica = Replica(config, engine=OneBitOffEngine(), storage=rig.faults)
    replica.start()
    server = ServerThread(create_app(replica))
    rig.stack.callback(server.stop)
    rig.attach(server.start())
    client, syncer = rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    outcome = rig.sync(client, syncer, "step-0")
    assert isinstance(outcome, WeightSyncError), outcome
    obs = rig.observe(
        "the engine's in-place apply writes one wrong bit (post-swap check)",
        "mismatch found after the swap; previous weights re-read from their source and served",
        outcome, allowed={START_IDENTITY},
    )  # fmt: skip
    assert obs.stage == "error" and "do not match the manifest" in (obs.error or "")
    assert rig.status()["degraded"] is None
