"""Every bad input raises its specific error, naming the snapshot (and the file or tensor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _support.models import toy_weights
from _support.weights import perturb
from weightsync.errors import (
    ChainError,
    InvalidInputError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    UnknownChecksumError,
    UnknownCodecError,
)
from weightsync.snapshot import MANIFEST_FILE, SnapshotStore, write_base, write_delta

pytestmark = pytest.mark.timeout(60)

SHARD = "model-00001.safetensors"


@pytest.fixture
def chain(tmp_path: Path, tiny_config: object) -> tuple[SnapshotStore, dict[str, torch.Tensor]]:
    """A base `b`, a delta `d1` onto it, a delta `d2` onto `d1`."""
    w0 = toy_weights()
    w1 = perturb(w0, seed=1)
    w2 = perturb(w1, seed=2)
    base = write_base(tmp_path, "b", w0, config=tiny_config)
    d1 = write_delta(tmp_path, "d1", parent=base, old=w0, new=w1)
    write_delta(tmp_path, "d2", parent=d1, old=w1, new=w2)
    return SnapshotStore(tmp_path), w0


def _root(store: SnapshotStore) -> Path:
    root = store.storage.local_path("")
    assert root is not None
    return root


def _edit_manifest(store: SnapshotStore, snapshot: str, **changes: object) -> None:
    path = _root(store) / snapshot / MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("identity", ["b", "d2"])
def test_flipped_byte_in_a_payload_file(chain: tuple[SnapshotStore, object], identity: str) -> None:
    store, _ = chain
    path = _root(store) / identity / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        SnapshotCorruptError, match=rf"snapshot '{identity}', file '{SHARD}'.*checksum"
    ):
        store.fetch(identity)
    with pytest.raises(SnapshotCorruptError, match=SHARD):
        store.materialize("d2")
    report = store.verify("d2")
    assert not report.ok
    assert any(identity in p and SHARD in p for p in report.problems)


def test_truncated_file(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    path = _root(store) / "d1" / SHARD
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SnapshotCorruptError, match=r"snapshot 'd1', file .*truncated"):
        store.fetch("d1")


@pytest.mark.parametrize("name", [SHARD, "config.json"])
def test_manifest_present_but_file_missing(chain: tuple[SnapshotStore, object], name: str) -> None:
    store, _ = chain
    (_root(store) / "b" / name).unlink()
    assert store.list_snapshots() == ["b", "d1", "d2"]
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot 'b', file '{name}'.*missing"):
        store.read_file(store.read_manifest("b"), name)
    report = store.verify("d2")
    assert not report.ok and any(name in p for p in report.problems)


def test_missing_file_on_fetch(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    (_root(store) / "d2" / SHARD).unlink()
    with pytest.raises(SnapshotCorruptError, match=rf"'d2', file '{SHARD}'.*missing"):
        store.fetch("d2")


def test_delta_whose_parent_is_missing(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    shutil.rmtree(_root(store) / "d1")
    with pytest.raises(ChainError, match=r"'d2' needs parent 'd1'"):
        store.chain("d2")
    with pytest.raises(ChainError, match="'d1'"):
        store.materialize("d2")
    report = store.verify("d2")
    assert not report.ok and "d1" in report.problems[0]


def test_delta_whose_parent_was_replaced_by_another_shape(
    chain: tuple[SnapshotStore, object], tiny_config: object
) -> None:
    store, weights = chain
    shutil.rmtree(_root(store) / "d1")
    other = dict(weights)
    other["model.norm.weight"] = torch.zeros(8, dtype=torch.bfloat16)
    write_base(store.storage, "d1", other, config=tiny_config)
    with pytest.raises(ChainError, match=r"'d2'.*'d1'"):
        store.chain("d2")


def test_delta_whose_parent_changed_dtype(
    chain: tuple[SnapshotStore, object], tiny_config: object
) -> None:
    store, _ = chain
    path = _root(store) / "d1" / MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc["tensors"]["model.norm.weight"]["dtype"] = "F32"
    path.write_text(json.dumps(doc))
    with pytest.raises(ChainError, match=r"'model.norm.weight' is \[32\] BF16 but \[32\] F32"):
        store.chain("d2")


def test_cycle_is_detected(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    _edit_manifest(store, "d1", parent="d2")
    with pytest.raises(ChainError, match="cycle"):
        store.chain("d2")


def test_write_delta_with_shape_or_dtype_change(tmp_path: Path, tiny_config: object) -> None:
    old = toy_weights()
    base = write_base(tmp_path, "b", old, config=tiny_config)
    as_fp32 = {**old, "model.norm.weight": old["model.norm.weight"].float()}
    with pytest.raises(ChainError, match=r"'model.norm.weight' is \[32\] F32.*needs a base"):
        write_delta(tmp_path, "d", parent=base, old=old, new=as_fp32)
    reshaped = {**old, "model.norm.weight": torch.zeros(2, 16, dtype=torch.bfloat16)}
    with pytest.raises(ChainError, match=r"\[2, 16\]"):
        write_delta(tmp_path, "d", parent=base, old=old, new=reshaped)
    renamed = {("x" if k == "model.norm.weight" else k): v for k, v in old.items()}
    with pytest.raises(ChainError, match="names"):
        write_delta(tmp_path, "d", parent=base, old=old, new=renamed)
    assert SnapshotStore(tmp_path).list_snapshots() == ["b"]


def test_write_delta_against_other_weights_than_the_parent(
    tmp_path: Path, tiny_config: object
) -> None:
    old = toy_weights()
    base = write_base(tmp_path, "b", old, config=tiny_config)
    not_parent = perturb(old, seed=3)
    with pytest.raises(ChainError, match="not what parent 'b' stands for"):
        write_delta(tmp_path, "d", parent=base, old=not_parent, new=old)


def test_write_delta_that_skips_the_old_check_is_refused_where_it_is_loaded(
    tmp_path: Path, tiny_config: object
) -> None:
    """`verify_old=False` trusts the caller that `old` is the parent's image; when it is
    not, the delta is written but loading it fails the checksums, never serves."""
    old = toy_weights()
    base = write_base(tmp_path, "b", old, config=tiny_config)
    not_parent = perturb(old, seed=3)
    new = perturb(old, seed=4)
    write_delta(tmp_path, "d", parent=base, old=not_parent, new=new, verify_old=False)
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotCorruptError, match="'d'"):
        store.materialize("d")
    fetched = store.fetch("d")
    patches = fetched.patches(old)
    with pytest.raises(SnapshotCorruptError, match="'d', tensor"):
        for name, patch in patches.items():
            fetched.verify_patched(name, old, patch)


def test_write_delta_when_parent_is_not_in_the_storage(tmp_path: Path, tiny_config: object) -> None:
    old = toy_weights()
    base = write_base(tmp_path / "one", "b", old, config=tiny_config)
    with pytest.raises(ChainError, match="parent 'b' is not complete"):
        write_delta(tmp_path / "two", "d", parent=base, old=old, new=old)


def test_unknown_codec_or_checksum(
    chain: tuple[SnapshotStore, object], tiny_config: object
) -> None:
    store, weights = chain
    base = store.read_manifest("b")
    with pytest.raises(UnknownCodecError, match=r"'d9'.*'nope'.*known"):
        write_delta(
            store.storage, "d9", parent=base, old=weights, new=weights, compression_format="nope"
        )
    with pytest.raises(UnknownChecksumError, match=r"'b9'.*'md77'"):
        write_base(store.storage, "b9", weights, config=tiny_config, checksum_format="md77")
    assert store.list_snapshots() == ["b", "d1", "d2"]
    _edit_manifest(store, "d1", compression_format="arc_v9")
    with pytest.raises(UnknownCodecError, match=r"snapshot 'd1'.*arc_v9"):
        store.read_manifest("d1")
    _edit_manifest(store, "d2", checksum_format="sha999")
    with pytest.raises(UnknownChecksumError, match=r"snapshot 'd2'.*sha999"):
        store.fetch("d2")


def test_alias_checksum_is_stored_canonically(tmp_path: Path, tiny_config: object) -> None:
    m = write_base(tmp_path, "b", toy_weights(), config=tiny_config, checksum_format="alder32")
    assert m.checksum_format == "adler32"
    assert SnapshotStore(tmp_path).verify("b").ok


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, "format_version 99"),
        ({"format_version": "1"}, "format_version '1'"),
        ({"kind": "full"}, "kind 'full'"),
        ({"identity": "other"}, "names identity 'other'"),
        ({"tensors": []}, "'tensors' must be dict"),
        ({"parent": "../escape"}, "path separator"),
        ({"base": "b", "parent": None}, "lacks parent"),
    ],
)
def test_malformed_manifest(
    chain: tuple[SnapshotStore, object], change: dict[str, object], message: str
) -> None:
    store, _ = chain
    _edit_manifest(store, "d1", **change)
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot 'd1'.*{message}"):
        store.read_manifest("d1")


def test_manifest_that_is_not_json(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    (_root(store) / "b" / MANIFEST_FILE).write_bytes(b"{not json")
    with pytest.raises(SnapshotCorruptError, match="snapshot 'b' is not valid JSON"):
        store.read_manifest("b")


def test_manifest_tensor_in_an_unlisted_file(chain: tuple[SnapshotStore, object]) -> None:
    store, _ = chain
    path = _root(store) / "b" / MANIFEST_FILE
    doc = json.loads(path.read_text())
    doc["tensors"]["model.norm.weight"]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotCorruptError, match="does not list"):
        store.read_manifest("b")


def test_directory_without_manifest_is_not_a_snapshot(
    chain: tuple[SnapshotStore, object],
) -> None:
    store, _ = chain
    (_root(store) / "d2" / MANIFEST_FILE).unlink()
    (_root(store) / "stray").mkdir()
    assert store.list_snapshots() == ["b", "d1"]
    assert not store.exists("d2")
    with pytest.raises(SnapshotNotFoundError, match=r"'d2'.*no manifest"):
        store.read_manifest("d2")
    with pytest.raises(SnapshotNotFoundError, match=r"'nothing'.*does not exist"):
        store.fetch("nothing")


def test_patches_against_weights_of_another_shape(chain: tuple[SnapshotStore, object]) -> None:
    store, weights = chain
    fetched = store.fetch("d1")
    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(ChainError, match=r"'d1' patches tensor 'model.norm.weight'"):
        fetched.patches(missing)
    wrong = {**weights, "model.norm.weight": weights["model.norm.weight"].float()}
    with pytest.raises(ChainError, match=r"'model.norm.weight' is \[32\] F32"):
        fetched.patches(wrong)
    with pytest.raises(ChainError, match="is a delta"):
        fetched.tensors()


def test_verify_patched_names_the_tensor(chain: tuple[SnapshotStore, object]) -> None:
    store, weights = chain
    fetched = store.fetch("d1")
    patches = fetched.patches(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    other = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(SnapshotCorruptError, match=rf"'d1', tensor '{name}' fails its change sum"):
        fetched.verify_patched(name, weights, patches[other])


def test_snapshots_are_immutable(chain: tuple[SnapshotStore, object], tiny_config: object) -> None:
    store, weights = chain
    with pytest.raises(InvalidInputError, match="'b' already exists"):
        write_base(store.storage, "b", weights, config=tiny_config)


def test_a_malformed_payload_among_a_files_tensors_is_named(
    tmp_path: Path, tiny_config: object
) -> None:
    """The tensors of one weight file decode as a batch; a payload in it that is
    malformed (here cut short after the file checks passed) is reported by snapshot and
    tensor, not as the batch's."""
    old = toy_weights()
    base = write_base(tmp_path, "b", old, config=tiny_config)
    write_delta(tmp_path, "d", parent=base, old=old, new=perturb(old, seed=5))
    fetched = SnapshotStore(tmp_path).fetch("d")
    payloads = fetched.payloads()
    victim = sorted(payloads)[len(payloads) // 2]
    payloads[victim] = payloads[victim][:-3]
    with pytest.raises(SnapshotCorruptError, match=rf"'d', tensor '{victim}' \(") as raised:
        fetched.patches(old)
    assert "truncated" in str(raised.value) or "checksum mismatch" in str(raised.value)
