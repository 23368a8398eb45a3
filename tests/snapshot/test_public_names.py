"""The public doors of `weightsync.snapshot` and `weightsync.storage` (docs/architecture.md)."""

from __future__ import annotations

import weightsync.snapshot as snapshot
import weightsync.storage as storage


def test_snapshot_public_names() -> None:
    assert set(snapshot.__all__) == {
        "ADAPTER_CONFIG_FILE",
        "ADAPTER_WEIGHTS_FILE",
        "CONFIG_FILE",
        "FORMAT_VERSION",
        "INDEX_FILE",
        "MANIFEST_FILE",
        "SPEC_FILE",
        "FetchedSnapshot",
        "FileEntry",
        "Manifest",
        "SnapshotKind",
        "SnapshotStore",
        "TensorEntry",
        "VerifyReport",
        "materialize_to",
        "shard_file",
        "shard_plan",
        "verify_tensors",
        "write_base",
        "write_delta",
        "write_lora",
    }
    assert snapshot.MANIFEST_FILE == "weightsync.json"
    assert snapshot.FORMAT_VERSION == 1
    assert all(hasattr(snapshot, name) for name in snapshot.__all__)


def test_storage_public_names() -> None:
    assert set(storage.__all__) == {
        "FsspecStorage",
        "LocalStorage",
        "Storage",
        "StorageWrapper",
        "open_storage",
    }
    assert all(hasattr(storage, name) for name in storage.__all__)


def test_shard_plan() -> None:
    names = ["lm_head.weight", "model.layers.10.mlp.w", "model.layers.2.a", "model.norm.weight"]
    assert snapshot.shard_plan(names) == {
        "model-00000.safetensors": ["lm_head.weight", "model.norm.weight"],
        "model-00003.safetensors": ["model.layers.2.a"],
        "model-00011.safetensors": ["model.layers.10.mlp.w"],
    }
    assert snapshot.shard_file("model.language_model.layers.0.x") == "model-00001.safetensors"
    assert snapshot.shard_file("model.mylayers.3.x") == "model-00000.safetensors"
