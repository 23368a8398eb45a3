"""Corrupted, truncated and missing snapshot files: every one is refused loudly, the replica
keeps serving its verified weights, and the trainer's next sync restores it."""

from __future__ import annotations

import pytest

from _support.fault_rig import START_IDENTITY, Rig, train_step
from _support.faulty_storage import Fault, in_snapshot
from weightsync.errors import HotloadFailedError

pytestmark = pytest.mark.timeout(120)


def _synced_rig(faults_rig: Rig) -> tuple[Rig, object, object, str]:
    faults_rig.start_replica()
    client, syncer = faults_rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    base = faults_rig.sync(client, syncer, "step-0")
    assert isinstance(base, str), base
    return faults_rig, client, syncer, base


# (case, file suffix, fault, checkpoint type of the faulty snapshot)
TRANSIT_FAULTS = [
    ("flipped byte in a delta payload", ".safetensors", Fault("flip", bool, offset=-3), "delta"),
    ("flipped byte in a base shard", ".safetensors", Fault("flip", bool, offset=-3), "base"),
    ("truncated delta shard", ".safetensors", Fault("truncate", bool, offset=-10), "delta"),
    ("truncated base shard", ".safetensors", Fault("truncate", bool, offset=-10), "base"),
    ("missing delta shard", ".safetensors", Fault("missing", bool), "delta"),
]


@pytest.mark.parametrize(
    ("case", "suffix", "fault", "kind"), TRANSIT_FAULTS, ids=[c[0] for c in TRANSIT_FAULTS]
)
def test_corrupt_file_in_transit_is_refused(faults_rig, case, suffix, fault, kind) -> None:
    rig, client, syncer, base = _synced_rig(faults_rig)
    train_step(client, seed=2)
    target = f"step-1-{client.session_id}"
    fault.match = in_snapshot(target, suffix)
    rig.faults.add(fault)
    outcome = rig.sync(client, syncer, "step-1", checkpoint_type=kind)
    assert isinstance(outcome, HotloadFailedError), outcome
    assert target in str(outcome) and "Deployment reports" in str(outcome)
    obs = rig.observe(case, "load fails (stage error); old weights served", outcome, allowed={base})
    assert obs.stage == "error" and target in (obs.error or "")
    assert obs.ledger_last == {
        "identity": target, "kind": kind, "result": "error", "error": obs.error
    }  # fmt: skip
    # The trainer's next sync (a base: the failed delta's chain is abandoned) restores sync.
    rig.faults.clear()
    train_step(client, seed=3)
    recovered = rig.sync(client, syncer, "step-2")
    assert recovered == f"step-2-{client.session_id}"
    rig.observe(f"{case}: next sync", "next sync loads", recovered, allowed={recovered})


def _edit(field: str, doc: dict) -> None:
    """Alter one field of a delta manifest the way a flipped byte there would."""
    tensor, file = _tensor(doc), _file(doc)
    if field == "tensor checksum":
        tensor["checksum"] = _flip_hex(tensor["checksum"])
    elif field == "file checksum":
        file["checksum"] = _flip_hex(file["checksum"])
    elif field == "file size":
        file["size_bytes"] ^= 1
    elif field == "tensor shape":
        tensor["shape"] = [tensor["shape"][0] ^ 1, *tensor["shape"][1:]]
    elif field == "tensor dtype":
        tensor["dtype"] = "float16"
    elif field == "parent":
        doc["parent"] = doc["parent"][:-1] + "x"
    elif field == "compression format":
        doc["compression_format"] = "wsdelta2"


MANIFEST_FIELDS = [
    "tensor checksum", "file checksum", "file size", "tensor shape", "tensor dtype", "parent",
    "compression format", "json syntax",
]  # fmt: skip


def _tensor(doc):
    return doc["tensors"][sorted(doc["tensors"])[1]]


def _file(doc):
    return doc["files"][sorted(f for f in doc["files"] if f.endswith(".safetensors"))[0]]


def _flip_hex(value: str) -> str:
    return ("1" if value[0] != "1" else "2") + value[1:]


@pytest.mark.parametrize("field", MANIFEST_FIELDS)
def test_corrupt_manifest_is_refused(faults_rig, field) -> None:
    import json

    rig, client, syncer, base = _synced_rig(faults_rig)
    train_step(client, seed=2)
    delta = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    path = rig.root / "store" / delta / "weightsync.json"
    raw = path.read_bytes()
    if field == "json syntax":
        tampered = raw.replace(b"{", b"[", 1)
    else:
        doc = json.loads(raw)
        _edit(field, doc)
        tampered = json.dumps(doc).encode()
    # Served to the replica only: the trainer's own reads stay clean.
    rig.faults.add(Fault("replace", in_snapshot(delta, "weightsync.json"), data=tampered))
    ok = syncer.hotload(delta)
    assert ok is False
    # What the deployment answers to the same request (a refusal, or a failed load).
    answer = rig.http.post("/hot_load/v1/models/hot_load", json={"identity": delta})
    refused = answer.status_code >= 400
    obs = rig.observe(
        f"manifest {field} altered", "refused (4xx) or load fails; old weights served",
        f"hotload() -> False; re-POST -> HTTP {answer.status_code} {answer.text[:120]}",
        allowed={base},
    )  # fmt: skip
    if refused:  # refused before loading: nothing recorded, nothing touched
        assert 400 <= answer.status_code < 500 and delta in answer.text, answer.text
        assert obs.ledger_last is not None and obs.ledger_last["identity"] != delta
    else:  # accepted, then the load failed verification
        assert obs.stage == "error" and delta in (obs.error or "")
        assert obs.ledger_last is not None and obs.ledger_last["result"] == "error"


def test_manifest_written_but_shard_absent(faults_rig) -> None:
    rig, client, syncer, base = _synced_rig(faults_rig)
    train_step(client, seed=2)
    delta = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    shard = sorted((rig.root / "store" / delta).glob("model-*.safetensors"))[0]
    shard.unlink()
    ok = syncer.hotload(delta)
    assert ok is False
    obs = rig.observe(
        "manifest written, shard absent", "load fails naming the file; old served", ok,
        allowed={base},
    )  # fmt: skip
    assert obs.stage == "error" and shard.name in (obs.error or "")
    train_step(client, seed=3)
    recovered = rig.sync(client, syncer, "step-2")
    assert recovered == f"step-2-{client.session_id}", recovered
    rig.observe("shard absent: next sync", "next sync loads a base", recovered, allowed={recovered})
    assert START_IDENTITY in {e["identity"] for e in rig.ledger()}
