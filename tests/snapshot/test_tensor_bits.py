"""`FetchedSnapshot.tensor_bits`: a base's tensors as read-only views of the fetched bytes.

What a base hot-load writes into the live weights, so it must hold exactly the bits
`tensors()` parses (every dtype, tensors in pieces assembled), share the fetched bytes
instead of copying them, and refuse everything `tensors()` refuses — a file holding
tensors the manifest does not place there, a missing tensor, another dtype or shape,
offsets beyond the file, a byte length that is not the shape's, bits that fail the
manifest checksum — naming the snapshot, the file or the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _support.bits import int_bits
from weightsync.codec import checksum_bytes, checksum_tensor
from weightsync.errors import ChainError, ChecksumMismatchError, SnapshotCorruptError
from weightsync.snapshot import FetchedSnapshot, Manifest, SnapshotStore, write_base, write_delta
from weightsync.snapshot.manifest import FileEntry, Piece, TensorEntry
from weightsync.snapshot.pieces import encode_base_pieces

SHARD = "model-00001.safetensors"
NAME = "model.layers.0.mlp.down_proj.weight"


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "model.embed_tokens.weight": torch.randn(12, 8, generator=gen).to(torch.bfloat16),
        NAME: torch.randn(8, 6, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=gen),
        "model.layers.1.mlp.up_proj.weight": torch.randn(5, 3, generator=gen).to(torch.float16),
        "model.layers.2.self_attn.q_proj.weight": torch.randn(4, 4, generator=gen).to(
            torch.float8_e4m3fn
        ),
        "model.layers.3.empty": torch.zeros(0, dtype=torch.bfloat16),
    }


def _same(flat: np.ndarray, tensor: torch.Tensor) -> bool:
    return flat.tobytes() == int_bits(tensor).numpy().tobytes()


def test_tensor_bits_are_views_of_the_fetched_bytes_equal_to_tensors(tmp_path: Path) -> None:
    weights = _weights()
    manifest = write_base(tmp_path, "b-1", weights, config={})
    fetched = SnapshotStore(tmp_path).fetch("b-1")
    parsed = fetched.tensors()
    got = fetched.tensor_bits()
    assert list(got) == sorted(weights)
    for name, flat in got.items():
        assert flat.ndim == 1 and flat.size == weights[name].numel(), name
        assert flat.dtype.itemsize == weights[name].element_size(), name
        assert _same(flat, weights[name]) and _same(flat, parsed[name]), name
        assert not flat.flags.writeable, name  # the fetched bytes cannot change under it
        if flat.size:  # no copy: the bits lie inside their file's bytes
            held = np.frombuffer(fetched.files[manifest.tensors[name].file], dtype=np.uint8)
            assert np.shares_memory(flat, held), name


def _pieced(root: Path, whole: torch.Tensor, files: dict[str, bytes] | None = None) -> None:
    """A base of one tensor stored as two column boxes, one per file (what two ranks write)."""
    half = whole.shape[1] // 2
    pieces = (
        Piece(file="model-00000.r00000.safetensors", offset=(0, 0), shape=(whole.shape[0], half)),
        Piece(
            file="model-00000.r00001.safetensors",
            offset=(0, half),
            shape=(whole.shape[0], whole.shape[1] - half),
        ),
    )
    if files is None:
        files = {p.file: encode_base_pieces({NAME: whole[p.slices()].contiguous()}) for p in pieces}
    manifest = Manifest(
        format_version=2,
        identity="pieced",
        kind="base",
        parent=None,
        base="pieced",
        compression_format=None,
        checksum_format="xxh3_64",
        tensors={
            NAME: TensorEntry(
                shape=tuple(whole.shape),
                dtype="BF16",
                file=pieces[0].file,
                checksum=checksum_tensor("xxh3_64", whole),
                pieces=pieces,
            )
        },
        files={
            n: FileEntry(size_bytes=len(d), checksum=checksum_bytes("xxh3_64", d))
            for n, d in files.items()
        },
        session_id=None,
        created_at="2026-01-01T00:00:00.000Z",
    )
    (root / "pieced").mkdir()
    for name, data in files.items():
        (root / "pieced" / name).write_bytes(data)
    (root / "pieced" / "weightsync.json").write_bytes(manifest.to_json_bytes())


def test_a_tensor_in_pieces_is_assembled_into_its_own_array(tmp_path: Path) -> None:
    whole = torch.randn(6, 10, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    _pieced(tmp_path, whole)
    fetched = SnapshotStore(tmp_path).fetch("pieced")
    flat = fetched.tensor_bits()[NAME]
    assert _same(flat, whole)
    assert flat.flags.writeable  # its own array, not a view of a file
    for data in fetched.files.values():
        assert not np.shares_memory(flat, np.frombuffer(data, dtype=np.uint8))


def test_a_piece_of_another_shape_is_refused(tmp_path: Path) -> None:
    whole = torch.randn(6, 10, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    files = {
        "model-00000.r00000.safetensors": encode_base_pieces({NAME: whole[:, :4].contiguous()}),
        "model-00000.r00001.safetensors": encode_base_pieces({NAME: whole[:, 5:].contiguous()}),
    }
    _pieced(tmp_path, whole, files)
    with pytest.raises(SnapshotCorruptError, match=r"'model-00000.r00000.safetensors' is \[6, 4\]"):
        SnapshotStore(tmp_path).fetch("pieced").tensor_bits()


def _header(entries: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _with_shard(tmp_path: Path, shard: bytes) -> FetchedSnapshot:
    """The base's fetch with its layer-0 shard replaced by `shard` (past the file check:
    what the tensor checks alone must refuse)."""
    write_base(tmp_path, "b-1", _weights(), config={})
    fetched = SnapshotStore(tmp_path).fetch("b-1")
    fetched.files[SHARD] = shard
    return fetched


def _layer0(tmp_path: Path) -> tuple[dict[str, object], bytes]:
    """Layer 0's shard as header entries and data section (to be edited)."""
    write_base(tmp_path / "orig", "b-1", _weights(), config={})
    data = (tmp_path / "orig" / "b-1" / SHARD).read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def test_a_file_holding_a_tensor_the_manifest_does_not_place_there_is_refused(
    tmp_path: Path,
) -> None:
    entries, body = _layer0(tmp_path)
    entries["model.layers.0.stowaway"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    fetched = _with_shard(tmp_path, _header(entries, body))
    with pytest.raises(SnapshotCorruptError, match=r"model-00001.*stowaway"):
        fetched.tensor_bits()


def test_a_tensor_missing_from_its_file_is_refused(tmp_path: Path) -> None:
    entries, body = _layer0(tmp_path)
    del entries[NAME]
    fetched = _with_shard(tmp_path, _header(entries, body))
    with pytest.raises(SnapshotCorruptError, match=rf"tensor '{NAME}' in '{SHARD}' is missing"):
        fetched.tensor_bits()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"dtype": "F16"}, r"is \[8, 6\] F16, the manifest says \[8, 6\] BF16"),
        ({"shape": [6, 8]}, r"is \[6, 8\] BF16, the manifest says \[8, 6\] BF16"),
        ({"shape": [8, 5]}, r"\(80 bytes\) but holds 96 bytes"),
        ({"data_offsets": [0, 1 << 40]}, r"beyond the file's"),
        ({"data_offsets": [8, 4]}, r"beyond the file's"),
        ({"shape": [8, True]}, r"malformed entry"),
        ({"shape": [8, -6]}, r"malformed entry"),
        ({"data_offsets": [0]}, r"malformed entry"),
        ({"dtype": 7}, r"malformed entry"),
    ],
)
def test_a_header_entry_that_is_not_the_manifests_tensor_is_refused(
    tmp_path: Path, edit: dict[str, object], match: str
) -> None:
    entries, body = _layer0(tmp_path)
    entry = entries[NAME]
    assert isinstance(entry, dict)
    entry.update(edit)
    fetched = _with_shard(tmp_path, _header(entries, body))
    with pytest.raises(SnapshotCorruptError, match=match) as caught:
        fetched.tensor_bits()
    assert "'b-1'" in str(caught.value)


def test_bits_that_fail_the_manifest_checksum_are_refused(tmp_path: Path) -> None:
    entries, body = _layer0(tmp_path)
    entry = entries[NAME]
    assert isinstance(entry, dict)
    flipped = bytearray(body)
    flipped[entry["data_offsets"][0] + 3] ^= 0x10
    fetched = _with_shard(tmp_path, _header(entries, bytes(flipped)))
    with pytest.raises(ChecksumMismatchError, match=rf"'b-1', tensor '{NAME}' fails its"):
        fetched.tensor_bits()


def test_a_delta_has_no_tensor_bits(tmp_path: Path) -> None:
    old = _weights()
    new = {n: t.clone() for n, t in old.items()}
    new[NAME].view(-1)[0] += 1
    base = write_base(tmp_path, "b-1", old, config={})
    write_delta(tmp_path, "d-1", parent=base, old=old, new=new)
    with pytest.raises(ChainError, match="apply its patches"):
        SnapshotStore(tmp_path).fetch("d-1").tensor_bits()
