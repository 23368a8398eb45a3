"""Nothing an input controls is unbounded: decompression bombs, oversized or mistyped
manifests, hints for files no manifest lists or behind a symlink out of the storage root,
identities too long for a path segment. Each is refused with a 4xx or a failed load that
names the snapshot, costs about what the snapshot legitimately holds, reveals no server
path, and the replica keeps serving its verified weights."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
import zstandard

from _support.fault_rig import Rig, train_step
from weightsync.codec import checksum_bytes, wsdelta1, xor_zstd
from weightsync.codec.framing import pack_header, seal
from weightsync.deployment import DeploymentConfig, DeploymentManager
from weightsync.errors import StoragePathError
from weightsync.server.prefetch import PrefetchingStorage
from weightsync.snapshot import MANIFEST_FILE, SnapshotStore, write_delta
from weightsync.snapshot.delta_shard import decode_delta_shard, encode_delta_shard
from weightsync.snapshot.manifest import MAX_MANIFEST_BYTES, FileEntry
from weightsync.storage import LocalStorage

pytestmark = pytest.mark.timeout(180)

HOT_LOAD = "/hot_load/v1/models/hot_load"
HINT = f"{HOT_LOAD}/hint"
#: What the bomb's frame claims; the tensor it stands for holds 8 KiB.
CLAIMED_BYTES = 1024**3


# --- decompression bombs, in a replica process whose peak RSS is read from /proc -----------


def _bomb_frame(claimed: int) -> bytes:
    """`claimed` zero bytes as one zstd frame that declares its size (~32 KB)."""
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=claimed)
    zeros = bytes(1 << 20)
    return b"".join(cobj.compress(zeros) for _ in range(claimed >> 20)) + cobj.flush()


def _bomb_payload(codec: str, tensor: torch.Tensor, frame: bytes) -> bytes:
    """A payload of `codec` for `tensor` with the bomb where its zstd stream belongs."""
    if codec == "xor-zstd":
        return seal([pack_header(xor_zstd.MAGIC, tensor), frame])
    n, m = tensor.numel(), 10
    assert n <= wsdelta1.CHUNK_ELEMENTS
    k = wsdelta1.choose_low_bits(n, m)
    low = bytes((m * k + 7) // 8)
    row = struct.pack("<BBIIII", wsdelta1.MODE_SPARSE, k, m, len(frame), len(low), 0)
    table = struct.pack("<QI", wsdelta1.CHUNK_ELEMENTS, 1)
    return seal([pack_header(wsdelta1.MAGIC, tensor), table, row, frame, low])


def write_bomb_delta(
    store_dir: Path, identity: str, parent: str, old: dict[str, torch.Tensor], codec: str
) -> str:
    """A delta onto `parent` whose largest tensor's payload is a bomb; every file and the
    manifest are consistent (sizes, checksums), as a hostile writer would make them."""
    store = SnapshotStore(store_dir)
    new = {name: t.clone() for name, t in old.items()}
    for t in new.values():
        t.view(-1)[0] = t.view(-1)[0] + 1
    manifest = write_delta(
        store.storage, identity, parent=store.read_manifest(parent), old=old, new=new,
        compression_format=codec,
    )  # fmt: skip
    victim = max(manifest.tensors, key=lambda n: manifest.tensors[n].num_elements)
    file = manifest.tensors[victim].file
    payloads = {
        name: bytes(p)
        for name, p in decode_delta_shard(
            (store_dir / identity / file).read_bytes(), compression_format=codec, where=file
        ).items()
    }
    payloads[victim] = _bomb_payload(codec, old[victim], _bomb_frame(CLAIMED_BYTES))
    data = encode_delta_shard(payloads, compression_format=codec)
    (store_dir / identity / file).write_bytes(data)
    files = dict(manifest.files)
    files[file] = FileEntry(
        size_bytes=len(data), checksum=checksum_bytes(manifest.checksum_format, data)
    )
    tampered = dataclasses.replace(manifest, files=files)
    (store_dir / identity / MANIFEST_FILE).write_bytes(tampered.to_json_bytes())
    return victim


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["xor-zstd", "wsdelta1"])
def test_decompression_bomb_is_refused_at_the_tensor_size(faults_rig, tmp_path, codec) -> None:
    rig = faults_rig
    mgr = DeploymentManager(registry_dir=tmp_path / "registry")
    rig.stack.callback(mgr.close)
    rig.stack.callback(lambda: mgr.delete("bombed"))
    client, syncer = rig.trainer(mgr=mgr, deployment_id="bombed", recover_with_base=False)
    train_step(client, seed=1)
    start = rig.save(client, syncer, "step-0", checkpoint_type="base")
    config = DeploymentConfig(
        deployment_id="bombed", storage=str(rig.root / "store"), snapshot=start,
        state_dir=str(tmp_path / "state"), startup_timeout_s=120,
        extra_args=("--engine-threads", "1"),
    )  # fmt: skip
    info = mgr.create_or_get(config)
    assert info.pid is not None
    rig.attach(info.url or "")
    target = f"bomb-{codec}-{client.session_id}"
    victim = write_bomb_delta(rig.root / "store", target, start, rig.references[start], codec)
    before = _peak_rss_mib(info.pid)
    meta = {"previous_snapshot_identity": start, "compression_format": codec}
    answer = rig.http.post(
        HOT_LOAD, json={"identity": target, "incremental_snapshot_metadata": meta}
    )
    assert answer.status_code == 200, answer.text
    rig.wait_idle()
    grew = _peak_rss_mib(info.pid) - before
    print(f"{codec} bomb: replica peak RSS {before:.0f} MiB, then +{grew:.1f} MiB")
    obs = rig.observe(
        f"zstd frame declaring 1 GiB (32 KB on disk) as a {codec} payload",
        f"load fails naming tensor, file, snapshot; peak RSS +{grew:.0f} MiB (< 128)",
        answer, allowed={start},
    )  # fmt: skip
    error = obs.error or ""
    assert obs.stage == "error" and "decompresses to more than" in error, error
    assert target in error and victim in error and ".safetensors" in error, error
    assert grew < 128, f"the replica's peak RSS grew by {grew:.0f} MiB"


# --- manifests --------------------------------------------------------------------------


def _started(rig: Rig) -> tuple[object, object, str]:
    rig.start_replica()
    client, syncer = rig.trainer(recover_with_base=False)
    train_step(client, seed=1)
    base = rig.sync(client, syncer, "step-0")
    assert isinstance(base, str), base
    return client, syncer, base


def test_oversized_manifest_is_refused_unread(faults_rig) -> None:
    rig = faults_rig
    _client, _syncer, base = _started(rig)
    identity = "huge-manifest-0badcafe"
    manifest = rig.root / "store" / identity / MANIFEST_FILE
    manifest.parent.mkdir(parents=True)
    with manifest.open("wb") as f:  # sparse: 160 MB on paper, nothing on disk
        f.truncate(160 * 1000**2)
    answers = [rig.http.post(HOT_LOAD, json={"identity": identity}) for _ in range(3)]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert f"{identity}/{MANIFEST_FILE}" in message and str(MAX_MANIFEST_BYTES) in message
    assert f"{identity}/{MANIFEST_FILE}" not in rig.faults.reads  # sized, never read
    rig.observe(
        "a 160 MB manifest, POSTed three times", "HTTP 400 naming the file and the cap; unread",
        answers[-1], allowed={base},
    )  # fmt: skip


def test_manifest_format_version_true_is_refused(faults_rig) -> None:
    rig = faults_rig
    client, syncer, base = _started(rig)
    train_step(client, seed=2)
    delta = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    path = rig.root / "store" / delta / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    doc["format_version"] = True
    path.write_text(json.dumps(doc))
    answer = rig.http.post(HOT_LOAD, json={"identity": delta})
    assert answer.status_code == 400, answer.text
    assert "format_version True" in answer.json()["error"]["message"]
    rig.observe(
        "manifest format_version: true", "HTTP 400 naming format_version; nothing loaded",
        answer, allowed={base},
    )  # fmt: skip


# --- hints --------------------------------------------------------------------------------


def test_hint_without_a_manifest_is_refused_and_reads_nothing(faults_rig) -> None:
    rig = faults_rig
    _client, _syncer, base = _started(rig)
    partial = rig.root / "store" / "partial-0badcafe"
    partial.mkdir()
    (partial / "model-00000.safetensors").write_bytes(os.urandom(1 << 20))
    answer = rig.http.post(
        HINT, json={"identity": "partial-0badcafe", "files": ["model-00000.safetensors"]}
    )
    assert answer.status_code == 404, answer.text
    assert "no manifest" in answer.json()["error"]["message"]
    assert not any(p.startswith("partial-0badcafe/model") for p in rig.faults.reads)
    assert rig.replica.storage is not None and rig.replica.storage.cached_paths() == []
    rig.observe(
        "hint naming files of a directory with no manifest", "HTTP 404; nothing read or held",
        answer, allowed={base},
    )  # fmt: skip


def test_hint_of_a_file_the_manifest_does_not_list_is_refused(faults_rig) -> None:
    rig = faults_rig
    _client, _syncer, base = _started(rig)
    (rig.root / "store" / base / "extra.bin").write_bytes(b"x" * 1000)
    answer = rig.http.post(HINT, json={"identity": base, "files": ["extra.bin"]})
    assert answer.status_code == 400, answer.text
    assert "does not list" in answer.json()["error"]["message"]
    assert rig.replica.storage is not None and rig.replica.storage.cached_paths() == []
    rig.observe(
        "hint of a file the manifest does not list", "HTTP 400; nothing read or held",
        answer, allowed={base},
    )  # fmt: skip


def test_symlinks_out_of_the_storage_root_are_refused(faults_rig, tmp_path) -> None:
    rig = faults_rig
    client, syncer, base = _started(rig)
    store = rig.root / "store"
    (store / "etc-0badcafe").symlink_to("/etc", target_is_directory=True)
    to_etc = rig.http.post(HINT, json={"identity": "etc-0badcafe", "files": ["passwd"]})
    assert to_etc.status_code == 400, to_etc.text
    assert "outside the storage root" in to_etc.json()["error"]["message"]
    # A complete snapshot moved out of the root and linked back in: refused as well.
    train_step(client, seed=2)
    moved = rig.save(client, syncer, "step-1", checkpoint_type="base")
    outside = tmp_path / "outside"
    outside.mkdir()
    (store / moved).rename(outside / moved)
    (store / moved).symlink_to(outside / moved, target_is_directory=True)
    for path in (HINT, HOT_LOAD):
        answer = rig.http.post(path, json={"identity": moved})
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert "outside the storage root" in message and str(outside) not in message, message
    assert rig.replica.storage is not None and rig.replica.storage.cached_paths() == []
    rig.observe(
        "hint and hot-load through a symlink in the storage root (to /etc, to a moved "
        "snapshot)", "HTTP 400; nothing read", answer, allowed={base},
    )  # fmt: skip


def test_read_ahead_expires_and_is_bounded(tmp_path) -> None:
    """The read-ahead cache itself: at most `max_bytes` held, and each entry is freed after
    its time-to-live even when no one asks for it again."""
    storage = LocalStorage(tmp_path)
    for name in ("a", "b", "c"):
        storage.write_bytes(f"s/{name}", b"x" * 100)
    prefetch = PrefetchingStorage(storage, max_bytes=250, ttl_s=0.2)
    try:
        assert prefetch.hint({"s/a": 100, "s/b": 100, "s/c": 100}) == ["s/a", "s/b"]
        assert prefetch.hint({"s/c": 99}) == []  # not the size the manifest states
        assert prefetch.held_bytes() == 200
        deadline = time.monotonic() + 30
        while prefetch._pending and time.monotonic() < deadline:  # freed by the timer
            time.sleep(0.02)
        assert prefetch.cached_paths() == [] and prefetch.held_bytes() == 0
        with pytest.raises(StoragePathError):
            os.symlink("/etc", tmp_path / "etc")
            prefetch.hint({"etc/passwd": 1})
    finally:
        prefetch.close()


def test_hinted_files_are_dropped_when_the_load_is_refused(faults_rig) -> None:
    rig = faults_rig
    client, syncer, base = _started(rig)
    train_step(client, seed=2)
    d1 = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    train_step(client, seed=3)
    d2 = rig.save(client, syncer, "step-2", checkpoint_type="delta")  # its parent: d1
    hinted = rig.http.post(HINT, json={"identity": d2})
    assert hinted.status_code == 200 and hinted.json()["replicas"][0]["queued_files"]
    refused = rig.http.post(HOT_LOAD, json={"identity": d2})
    assert refused.status_code == 409, refused.text
    assert rig.replica.storage is not None
    assert not [p for p in rig.replica.storage.cached_paths() if p.startswith(f"{d2}/")]
    rig.observe(
        "hint, then the hot-load is refused (parent not served)",
        "HTTP 409; the read-ahead is dropped", refused, allowed={base},
    )  # fmt: skip
    assert d1 not in {e["identity"] for e in rig.ledger()}


# --- identities and error bodies ------------------------------------------------------------


def test_identity_of_400_utf8_bytes_is_bad_input(faults_rig) -> None:
    rig = faults_rig
    _client, _syncer, base = _started(rig)
    identity = "é" * 200  # 200 characters: passed the old rule, then ENAMETOOLONG
    answer = rig.http.post(HOT_LOAD, json={"identity": identity})
    assert answer.status_code == 400, answer.text
    assert "400 UTF-8 bytes" in answer.json()["error"]["message"]
    assert not any(p.startswith(identity[:10]) for p in rig.faults.reads)  # no retries
    rig.observe(
        "identity of 400 UTF-8 bytes", "HTTP 400 (not a retried 502)", answer, allowed={base}
    )


def test_error_bodies_name_paths_relative_to_the_storage_root(faults_rig) -> None:
    rig = faults_rig
    _client, _syncer, base = _started(rig)
    partial = rig.root / "store" / "half-0badcafe"
    partial.mkdir()
    answers = [
        rig.http.post(HOT_LOAD, json={"identity": "never-saved-0badcafe"}),
        rig.http.post(HOT_LOAD, json={"identity": "half-0badcafe"}),
        rig.http.post(HINT, json={"identity": "half-0badcafe"}),
    ]
    root = str(rig.root)
    for answer in answers:
        assert answer.status_code == 404, answer.text
        message = answer.json()["error"]["message"]
        assert root not in message and str(Path(root).resolve()) not in message, message
        assert "<storage>" in message and "0badcafe" in message, message
    rig.observe(
        "errors for unknown and incomplete snapshots", "HTTP 404 naming <storage>, no server path",
        answers[0], allowed={base},
    )  # fmt: skip
    assert not [e for e in rig.ledger() if "0badcafe" in e["identity"]]  # nothing recorded


def test_a_failed_load_reports_its_error_without_server_paths(faults_rig) -> None:
    rig = faults_rig
    client, syncer, base = _started(rig)
    train_step(client, seed=2)
    delta = rig.save(client, syncer, "step-1", checkpoint_type="delta")
    shard = sorted((rig.root / "store" / delta).glob("model-*.safetensors"))[0]
    shard.unlink()
    answer = rig.http.post(HOT_LOAD, json={"identity": delta})
    assert answer.status_code == 200, answer.text
    obs = rig.observe(
        "a load that fails on a missing shard: its status error", "error names <storage>/…",
        answer, allowed={base},
    )  # fmt: skip
    error = obs.error or ""
    assert obs.stage == "error" and f"<storage>/{delta}" in error, error
    assert str(rig.root) not in error and str(rig.root.resolve()) not in error, error
    last = rig.status()["last_load"]
    assert last is not None and str(rig.root) not in (last.get("error") or ""), last
