"""The hot-load API end to end against a real replica on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from _support.bits import same_bits
from _support.chain import Chain
from _support.serving import assert_serves, hot_load, wait_loaded
from weightsync.codec import list_codecs

BASE, D1, D2, D3 = (f"{n}-0badcafe" for n in ("base", "step1", "step2", "step3"))
pytestmark = pytest.mark.timeout(120)


def test_base_then_deltas(serve, chain: Chain) -> None:
    client, replica = serve()
    assert_serves(client, replica, chain, BASE)
    for parent, identity in ((BASE, D1), (D1, D2), (D2, D3)):
        r = hot_load(client, identity, parent)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "accepted"
        status = wait_loaded(client, identity)
        assert status["loading_state"]["stage"] == "ready", status
        last = status["last_load"]
        assert last["identity"] == identity and last["result"] == "ok"
        assert last["pause_s"] > 0 and last["bytes_fetched"] > 0
        assert last["total_s"] >= last["pause_s"]
        assert_serves(client, replica, chain, identity)
    entries = client.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"]
    assert [(e["identity"], e["kind"], e["parent"], e["result"]) for e in entries] == [
        (BASE, "base", None, "ok"),
        (D1, "delta", BASE, "ok"),
        (D2, "delta", D1, "ok"),
        (D3, "delta", D2, "ok"),
    ]
    assert all(e["pause_s"] > 0 for e in entries[1:])
    metrics = client.get("/metrics").text
    assert 'weightsync_hotloads_total{kind="delta",result="ok"} 3.0' in metrics
    assert "weightsync_hotload_pause_seconds_count 3.0" in metrics


@pytest.mark.parametrize("codec", list_codecs())
def test_every_codec_loads_bit_exact(serve, chain: Chain, codec: str) -> None:
    identity = chain.delta(f"via-{codec}", BASE, seed=7, compression_format=codec)
    client, replica = serve()
    r = client.post(
        "/hot_load/v1/models/hot_load",
        json={
            "identity": identity,
            "incremental_snapshot_metadata": {
                "previous_snapshot_identity": BASE,
                "compression_format": codec,
                "checksum_format": "xxh3_64",
            },
        },
    )
    assert r.status_code == 200, r.text
    assert wait_loaded(client, identity)["loading_state"]["stage"] == "ready"
    live = replica.engine.named_weights()
    assert all(same_bits(live[n], t) for n, t in chain.weights[identity].items())


def test_same_delta_twice_is_applied_once(serve, chain: Chain) -> None:
    client, replica = serve()
    assert hot_load(client, D1, BASE).status_code == 200
    wait_loaded(client, D1)
    again = hot_load(client, D1, BASE)
    assert again.status_code == 200 and again.json()["status"] == "already_serving"
    entries = client.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"]
    assert [e["identity"] for e in entries] == [BASE, D1]
    assert_serves(client, replica, chain, D1)


def test_wrong_parent_delta_is_refused_and_old_weights_serve(serve, chain: Chain) -> None:
    client, replica = serve()
    r = hot_load(client, D2, D1)  # the replica serves BASE, not D1
    assert r.status_code == 409
    assert D1 in r.json()["error"]["message"] and BASE in r.json()["error"]["message"]
    # Lying about the parent does not help: the manifest's parent is checked too.
    r = hot_load(client, D2, BASE)
    assert r.status_code == 409
    assert_serves(client, replica, chain, BASE)
    status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
    assert status["loading_state"]["stage"] == "ready"


def _corrupt_payload(chain: Chain, identity: str) -> None:
    manifest = chain.manifests[identity]
    name = next(f for f in manifest.files if f.endswith(".safetensors"))
    path = chain.root / identity / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _corrupt_tensor_field(chain: Chain, identity: str, field: str) -> str:
    path = chain.root / identity / "weightsync.json"
    doc = json.loads(path.read_text())
    name = sorted(doc["tensors"])[1]
    doc["tensors"][name][field] = "0" * len(doc["tensors"][name][field])
    path.write_text(json.dumps(doc))
    return name


# (how, what the error says): a wrong change sum is refused before the swap (only the
# pre-swap verify reads it); a wrong tensor checksum, by the check after it (the
# change sum was right), which puts the base back.
CORRUPTIONS = [
    ("payload", "checksum"),
    ("tensor-checksum", "tensor checksums do not match"),
    ("change-sum", "fails its change sum"),
]


@pytest.mark.parametrize(("how", "said"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_delta_is_detected_and_old_weights_serve(
    serve, chain: Chain, how: str, said: str
) -> None:
    assert chain.manifests[D1].format_version == 3  # wsdelta1: change sums carried
    if how == "payload":
        _corrupt_payload(chain, D1)
    else:
        _corrupt_tensor_field(chain, D1, "checksum" if how == "tensor-checksum" else "change_sum")
    client, replica = serve()
    assert hot_load(client, D1, BASE).status_code == 200
    status = wait_loaded(client, D1)
    assert status["loading_state"]["stage"] == "error"
    assert status["loading_state"]["target_snapshot_identity"] == D1
    assert D1 in status["loading_state"]["error"]
    assert said in status["loading_state"]["error"]
    assert_serves(client, replica, chain, BASE)
    entries = client.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"]
    assert entries[-1]["identity"] == D1 and entries[-1]["result"] == "error"
    assert "weightsync_verify_failures_total 1.0" in client.get("/metrics").text


def test_ledger_reset_accepts_only_a_base(serve, chain: Chain) -> None:
    client, replica = serve()
    r = client.post("/hot_load/v1/ledger/reset")
    assert r.status_code == 200 and r.json()["replicas"][0]["requires_base"] is True
    assert client.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"] == []
    r = hot_load(client, D1, BASE)
    assert r.status_code == 409 and "reset" in r.json()["error"]["message"]
    assert_serves(client, replica, chain, BASE)
    new_base = chain.base("base2", chain.weights[D2])
    assert hot_load(client, new_base).status_code == 200
    assert wait_loaded(client, new_base)["loading_state"]["stage"] == "ready"
    assert_serves(client, replica, chain, new_base)
    step = chain.delta("base2-step1", new_base, seed=11)
    assert hot_load(client, step, new_base).status_code == 200
    assert wait_loaded(client, step)["loading_state"]["stage"] == "ready"


def test_restart_recovers_last_verified_snapshot(serve, chain: Chain, tmp_path) -> None:
    client, replica = serve(state_dir=tmp_path / "kept")
    for parent, identity in ((BASE, D1), (D1, D2)):
        hot_load(client, identity, parent)
        wait_loaded(client, identity)
    _corrupt_payload(chain, D3)
    hot_load(client, D3, D2)
    assert wait_loaded(client, D3)["loading_state"]["stage"] == "error"
    replica.close()
    # A new process with the same state dir (and the same start command).
    client2, replica2 = serve(state_dir=tmp_path / "kept")
    status = client2.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
    assert status["recovered_from_ledger"] is True
    assert_serves(client2, replica2, chain, D2)
    entries = client2.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"]
    assert entries[-1]["identity"] == D2 and entries[-1]["recovered"] is True


def test_live_weight_checksums_prove_what_is_served(serve, chain: Chain) -> None:
    from weightsync.codec import checksum_tensor

    client, _ = serve()
    assert wait_loaded(client, BASE)["current_snapshot_identity"] == BASE
    assert hot_load(client, D1, BASE).status_code == 200
    wait_loaded(client, D1)
    for fmt in ("xxh3_64", "alder32"):
        doc = client.get("/hot_load/v1/weights", params={"checksum_format": fmt}).json()
        entry = doc["replicas"][0]
        assert entry["current_snapshot_identity"] == D1
        expected = {n: checksum_tensor(fmt, t) for n, t in chain.weights[D1].items()}
        assert entry["checksums"] == expected
        # Different from the base's weights: the delta really moved them.
        base_sums = {n: checksum_tensor(fmt, t) for n, t in chain.weights[BASE].items()}
        assert entry["checksums"] != base_sums
    r = client.get("/hot_load/v1/weights", params={"checksum_format": "md5"})
    assert r.status_code == 400
    assert "xxh3_64" in r.text
