"""Snapshots on object storage: memory:// and s3:// against a real S3-compatible server."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from _support.bits import assert_bits_equal
from _support.models import toy_weights
from _support.weights import perturb
from weightsync.errors import SnapshotCorruptError
from weightsync.snapshot import (
    MANIFEST_FILE,
    SnapshotStore,
    materialize_to,
    write_base,
    write_delta,
)
from weightsync.storage import open_storage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> SnapshotStore:
    if request.param == "memory":
        return SnapshotStore(f"memory://ws-snap-{secrets.token_hex(4)}/runs")
    url = request.getfixturevalue("s3_bucket_url")
    options: dict[str, Any] = request.getfixturevalue("s3_storage_options")
    return SnapshotStore(open_storage(url, **options))


def test_chain_round_trip(store: SnapshotStore, tiny_config: object, tmp_path: Path) -> None:
    assert store.list_snapshots() == []  # the root does not exist yet
    w0 = toy_weights()
    w1 = perturb(w0, seed=1)
    w2 = perturb(w1, seed=2)
    base = write_base(store.storage, "b-1", w0, config=tiny_config)
    d1 = write_delta(store.storage, "d-1", parent=base, old=w0, new=w1)
    write_delta(store.storage, "d-2", parent=d1, old=w1, new=w2)
    # A fresh reader (another process would have no cache) sees the same thing.
    reader = SnapshotStore(store.storage)
    assert reader.list_snapshots() == ["b-1", "d-1", "d-2"]
    assert reader.snapshot_url("d-2") == f"{store.storage.url}/d-2"
    assert reader.local_tokenizer_dir("d-2") is None
    assert_bits_equal(reader.materialize("d-2"), w2)
    assert reader.verify("d-2").ok
    out = materialize_to(reader, "d-1", tmp_path / "out")
    assert (out / "config.json").is_file()


def test_incomplete_and_corrupt_snapshots(store: SnapshotStore, tiny_config: object) -> None:
    weights = toy_weights()
    write_base(store.storage, "b", weights, config=tiny_config)
    store.storage.write_bytes("half/config.json", b"{}")
    assert store.list_snapshots() == ["b"]
    manifest = store.read_manifest("b")
    shard = "model-00002.safetensors"
    data = bytearray(store.storage.read_bytes(f"b/{shard}"))
    data[-1] ^= 0x80
    store.storage.write_bytes(f"b/{shard}", bytes(data))
    with pytest.raises(SnapshotCorruptError, match=f"snapshot 'b', file '{shard}'"):
        store.fetch("b")
    assert store.storage.exists(f"b/{MANIFEST_FILE}")
    assert manifest.files[shard].size_bytes == len(data)
