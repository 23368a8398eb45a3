"""Manifests are parsed strictly (types checked, keys named), refused unread past the size
cap, and parsed once per content however often a replica asks for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from _support.models import toy_weights
from _support.weights import perturb
from weightsync.errors import SnapshotCorruptError
from weightsync.snapshot import MANIFEST_FILE, Manifest, SnapshotStore, write_base, write_delta
from weightsync.storage import LocalStorage


@pytest.fixture
def delta_doc(tmp_path: Path, tiny_config: object) -> dict[str, Any]:
    """A `wsdelta1` delta's manifest: format version 3, every tensor with a change sum."""
    w0 = toy_weights()
    base = write_base(tmp_path, "b", w0, config=tiny_config)
    write_delta(tmp_path, "d", parent=base, old=w0, new=perturb(w0, seed=1))
    doc = dict(json.loads((tmp_path / "d" / MANIFEST_FILE).read_bytes()))
    assert doc["format_version"] == 3
    assert all(len(t["change_sum"]) == 32 for t in doc["tensors"].values())
    return doc


@pytest.mark.parametrize(
    ("codec", "checksum", "version"),
    [("wsdelta1", "xxh3_64", 3), ("wsdelta1", "blake3", 1), ("arc_v2", "xxh3_64", 1)],
)
def test_which_deltas_carry_change_sums(
    tmp_path: Path, tiny_config: object, codec: str, checksum: str, version: int
) -> None:
    """Only codecs that add the sum up from their changes write it, and never with a
    cryptographic checksum (the sum is no defence against crafted bits)."""
    w0 = toy_weights()
    base = write_base(tmp_path, "b", w0, config=tiny_config, checksum_format=checksum)
    manifest = write_delta(
        tmp_path, "d", parent=base, old=w0, new=perturb(w0, seed=1),
        compression_format=codec, checksum_format=checksum,
    )  # fmt: skip
    assert manifest.format_version == version
    assert all((t.change_sum is not None) == (version == 3) for t in manifest.tensors.values())
    assert SnapshotStore(tmp_path).verify("d").ok


def _edit(doc: dict[str, Any], case: str) -> None:
    tensor_name, file_name = sorted(doc["tensors"])[0], sorted(doc["files"])[0]
    tensor, file = doc["tensors"][tensor_name], doc["files"][file_name]
    if case == "format_version true":
        doc["format_version"] = True
    elif case == "format_version as a string":
        doc["format_version"] = "1"
    elif case == "size as a string":
        file["size_bytes"] = str(file["size_bytes"])
    elif case == "negative size":
        file["size_bytes"] = -1
    elif case == "size as a bool":
        file["size_bytes"] = True
    elif case == "file entry not an object":
        doc["files"][file_name] = 7
    elif case == "tensor entry not an object":
        doc["tensors"][tensor_name] = "x"
    elif case == "unknown kind":
        doc["kind"] = "patch"
    elif case == "shape of strings":
        tensor["shape"] = ["8", "8"]
    elif case == "num_changed negative":
        tensor["num_changed"] = -3
    elif case == "num_changed past the tensor":
        tensor["num_changed"] = 10**12
    elif case == "num_changed as a float":
        tensor["num_changed"] = 1.5
    elif case == "files not an object":
        doc["files"] = []
    elif case == "change_sum not hex":
        tensor["change_sum"] = "z" * 32
    elif case == "change_sum in upper case":
        tensor["change_sum"] = tensor["change_sum"].upper()
    elif case == "change_sum too short":
        tensor["change_sum"] = tensor["change_sum"][:16]
    elif case == "change_sum as an int":
        tensor["change_sum"] = 5
    elif case == "change sums in version 1":
        doc["format_version"] = 1
    elif case == "version 3 without change sums":
        for entry in doc["tensors"].values():
            entry.pop("change_sum", None)


# (case, what the error must name)
CASES = [
    ("format_version true", "format_version"),
    ("format_version as a string", "format_version"),
    ("size as a string", "'size_bytes' must be int"),
    ("negative size", "'size_bytes' is negative"),
    ("size as a bool", "'size_bytes' must be int"),
    ("file entry not an object", "must be a JSON object"),
    ("tensor entry not an object", "must be a JSON object"),
    ("unknown kind", "kind 'patch'"),
    ("shape of strings", "'shape'"),
    ("num_changed negative", "'num_changed'"),
    ("num_changed past the tensor", "'num_changed'"),
    ("num_changed as a float", "'num_changed' must be int"),
    ("files not an object", "'files' must be dict"),
    ("change_sum not hex", "'change_sum' must be 32 lowercase hex"),
    ("change_sum in upper case", "'change_sum' must be 32 lowercase hex"),
    ("change_sum too short", "'change_sum' must be 32 lowercase hex"),
    ("change_sum as an int", "'change_sum' must be str"),
    ("change sums in version 1", r"format_version 1 but has change sums \(that is version 3\)"),
    ("version 3 without change sums", "format_version 3 but has neither pieces nor change sums"),
]


@pytest.mark.parametrize(("case", "named"), CASES, ids=[c[0] for c in CASES])
def test_mistyped_fields_are_refused_naming_the_key(delta_doc, case, named) -> None:
    Manifest.from_json_bytes(json.dumps(delta_doc).encode(), identity="d")  # the control
    _edit(delta_doc, case)
    with pytest.raises(SnapshotCorruptError, match=named) as e:
        Manifest.from_json_bytes(json.dumps(delta_doc).encode(), identity="d")
    assert "'d'" in str(e.value)


class CountingStorage(LocalStorage):
    """Local storage that counts the reads of each path (the seam the cache is seen at)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read_bytes(self, path: str) -> bytes:
        self.reads.append(path)
        return super().read_bytes(path)


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path, tiny_config) -> None:
    write_base(tmp_path, "b", toy_weights(), config=tiny_config)
    size = (tmp_path / "b" / MANIFEST_FILE).stat().st_size
    storage = CountingStorage(tmp_path)
    store = SnapshotStore(storage, max_manifest_bytes=size - 1)
    with pytest.raises(SnapshotCorruptError, match=f"{size} bytes, over the limit of {size - 1}"):
        store.read_manifest("b")
    assert storage.reads == []
    with pytest.raises(SnapshotCorruptError, match="over the limit"):  # bytes given directly
        Manifest.from_json_bytes(b" " * 11, identity="b", max_bytes=10)
    assert SnapshotStore(storage, max_manifest_bytes=size).read_manifest("b").identity == "b"


def test_a_manifest_is_parsed_once_per_content(tmp_path: Path, tiny_config) -> None:
    w0 = toy_weights()
    store = SnapshotStore(CountingStorage(tmp_path))
    write_base(tmp_path, "b", w0, config=tiny_config)
    first = store.read_manifest("b")
    assert store.read_manifest("b") is first  # read again (cheap), not parsed again
    # Deleted and re-saved under the same name with other weights: the same size, new bytes.
    shutil.rmtree(tmp_path / "b")
    write_base(tmp_path, "b", perturb(w0, seed=5), config=tiny_config)
    again = store.read_manifest("b")
    assert again is not first and again.tensors != first.tensors
    assert store.read_manifest("b") is again
