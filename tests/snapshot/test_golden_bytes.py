"""FORMAT.md pinned byte for byte: a tiny base and a `full` delta onto it.

If this test fails, the on-disk format changed: either the change is a bug, or
FORMAT.md and `format_version` must change with it (and old snapshots keep
reading). Never "fix" this test by pasting new bytes without doing that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from _support.bits import assert_bits_equal
from weightsync.snapshot import SnapshotStore, write_base, write_delta

pytestmark = pytest.mark.timeout(30)

OLD = {
    "model.embed_tokens.weight": torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.bfloat16),
    "model.layers.0.input_layernorm.weight": torch.tensor([1.0, 0.25], dtype=torch.float32),
}
NEW = {
    "model.embed_tokens.weight": torch.tensor([[1.0, -2.0], [0.5, 1.0]], dtype=torch.bfloat16),
    "model.layers.0.input_layernorm.weight": torch.tensor([1.0, 0.5], dtype=torch.float32),
}

# fmt: off
GOLDEN: dict[tuple[str, str], bytes] = {
    ("golden-base", "config.json"): b'''{
  "model_type": "golden"
}
''',
    ("golden-base", "model-00000.safetensors"): bytes.fromhex(
        "70000000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c"
        "226d6f64656c2e656d6265645f746f6b656e732e776569676874223a7b226474797065223a224246"
        "3136222c227368617065223a5b322c325d2c22646174615f6f666673657473223a5b302c385d7d7d"
        "803f00c0003f0000"
    ),
    ("golden-base", "model-00001.safetensors"): bytes.fromhex(
        "80000000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c"
        "226d6f64656c2e6c61796572732e302e696e7075745f6c617965726e6f726d2e776569676874223a"
        "7b226474797065223a22463332222c227368617065223a5b325d2c22646174615f6f666673657473"
        "223a5b302c385d7d7d202020202020200000803f0000803e"
    ),
    ("golden-base", "model.safetensors.index.json"): b'''{
  "metadata": {
    "total_size": 16
  },
  "weight_map": {
    "model.embed_tokens.weight": "model-00000.safetensors",
    "model.layers.0.input_layernorm.weight": "model-00001.safetensors"
  }
}
''',
    ("golden-base", "model.weight.spec.json"): b'''{
  "tensor_map": {
    "model.embed_tokens.weight": {
      "shape": [
        2,
        2
      ],
      "dtype": "BF16"
    },
    "model.layers.0.input_layernorm.weight": {
      "shape": [
        2
      ],
      "dtype": "F32"
    }
  }
}
''',
    ("golden-base", "weightsync.json"): b'''{
  "format_version": 1,
  "identity": "golden-base",
  "kind": "base",
  "parent": null,
  "base": "golden-base",
  "compression_format": null,
  "checksum_format": "xxh3_64",
  "session_id": "0123abcd",
  "created_at": "2026-01-01T00:00:00.000Z",
  "stats": {
    "full_bytes": 16,
    "num_changed": 6,
    "num_elements": 6,
    "num_tensors": 2,
    "payload_bytes": 272
  },
  "files": {
    "config.json": {
      "size_bytes": 29,
      "checksum": "974bb89b054c4edc"
    },
    "model-00000.safetensors": {
      "size_bytes": 128,
      "checksum": "fb51037fb6e666aa"
    },
    "model-00001.safetensors": {
      "size_bytes": 144,
      "checksum": "12150ddabd4d1d6f"
    },
    "model.safetensors.index.json": {
      "size_bytes": 199,
      "checksum": "e105c9a64bfc5084"
    },
    "model.weight.spec.json": {
      "size_bytes": 247,
      "checksum": "100f694635cc22b3"
    }
  },
  "tensors": {
    "model.embed_tokens.weight": {
      "shape": [
        2,
        2
      ],
      "dtype": "BF16",
      "file": "model-00000.safetensors",
      "checksum": "d0a61519b475e962"
    },
    "model.layers.0.input_layernorm.weight": {
      "shape": [
        2
      ],
      "dtype": "F32",
      "file": "model-00001.safetensors",
      "checksum": "2115720ac1212612"
    }
  }
}
''',
    ("golden-delta", "model-00000.safetensors"): bytes.fromhex(
        "98000000000000007b225f5f6d657461646174615f5f223a7b22636f6d7072657373696f6e5f666f"
        "726d6174223a2266756c6c222c22666f726d6174223a2277656967687473796e632d64656c746122"
        "7d2c226d6f64656c2e656d6265645f746f6b656e732e776569676874223a7b226474797065223a22"
        "5538222c227368617065223a5b385d2c22646174615f6f666673657473223a5b302c385d7d7d2020"
        "803f00c0003f803f"
    ),
    ("golden-delta", "model-00001.safetensors"): bytes.fromhex(
        "a8000000000000007b225f5f6d657461646174615f5f223a7b22636f6d7072657373696f6e5f666f"
        "726d6174223a2266756c6c222c22666f726d6174223a2277656967687473796e632d64656c746122"
        "7d2c226d6f64656c2e6c61796572732e302e696e7075745f6c617965726e6f726d2e776569676874"
        "223a7b226474797065223a225538222c227368617065223a5b385d2c22646174615f6f6666736574"
        "73223a5b302c385d7d7d2020202020200000803f0000003f"
    ),
    ("golden-delta", "weightsync.json"): b'''{
  "format_version": 1,
  "identity": "golden-delta",
  "kind": "delta",
  "parent": "golden-base",
  "base": "golden-base",
  "compression_format": "full",
  "checksum_format": "xxh3_64",
  "session_id": "0123abcd",
  "created_at": "2026-01-01T00:01:00.000Z",
  "stats": {
    "full_bytes": 16,
    "num_changed": 2,
    "num_changed_tensors": 2,
    "num_elements": 6,
    "num_tensors": 2,
    "payload_bytes": 352
  },
  "files": {
    "config.json": {
      "size_bytes": 29,
      "checksum": "974bb89b054c4edc"
    },
    "model-00000.safetensors": {
      "size_bytes": 168,
      "checksum": "60fcf621c6006297"
    },
    "model-00001.safetensors": {
      "size_bytes": 184,
      "checksum": "f193b2407f73854c"
    },
    "model.safetensors.index.json": {
      "size_bytes": 199,
      "checksum": "e105c9a64bfc5084"
    },
    "model.weight.spec.json": {
      "size_bytes": 247,
      "checksum": "100f694635cc22b3"
    }
  },
  "tensors": {
    "model.embed_tokens.weight": {
      "shape": [
        2,
        2
      ],
      "dtype": "BF16",
      "file": "model-00000.safetensors",
      "checksum": "80fe07451bf23636",
      "num_changed": 1
    },
    "model.layers.0.input_layernorm.weight": {
      "shape": [
        2
      ],
      "dtype": "F32",
      "file": "model-00001.safetensors",
      "checksum": "1e09312920d89815",
      "num_changed": 1
    }
  }
}
''',}
# fmt: on
# A delta repeats its parent's config, index and spec byte for byte.
for _name in ("config.json", "model.safetensors.index.json", "model.weight.spec.json"):
    GOLDEN["golden-delta", _name] = GOLDEN["golden-base", _name]


def _write_golden(root: Path) -> None:
    base = write_base(
        root,
        "golden-base",
        OLD,
        config={"model_type": "golden"},
        session_id="0123abcd",
        created_at="2026-01-01T00:00:00.000Z",
    )
    write_delta(
        root,
        "golden-delta",
        parent=base,
        old=OLD,
        new=NEW,
        compression_format="full",
        session_id="0123abcd",
        created_at="2026-01-01T00:01:00.000Z",
    )


def test_every_file_matches_the_golden_bytes(tmp_path: Path) -> None:
    _write_golden(tmp_path)
    written = {
        (snap.name, f.name): f.read_bytes()
        for snap in sorted(tmp_path.iterdir())
        for f in sorted(snap.iterdir())
    }
    assert sorted(written) == sorted(GOLDEN)
    for key, expected in GOLDEN.items():
        assert written[key] == expected, f"{key} differs from FORMAT.md's golden bytes"


def test_golden_snapshot_reads_back(tmp_path: Path) -> None:
    for (snap, name), data in GOLDEN.items():
        (tmp_path / snap).mkdir(exist_ok=True)
        (tmp_path / snap / name).write_bytes(data)
    store = SnapshotStore(tmp_path)
    assert store.list_snapshots() == ["golden-base", "golden-delta"]
    assert_bits_equal(store.materialize("golden-base"), OLD)
    assert_bits_equal(store.materialize("golden-delta"), NEW)
    assert store.verify("golden-delta").ok


def test_shards_load_with_the_safetensors_library() -> None:
    shard = load_safetensors(GOLDEN["golden-base", "model-00000.safetensors"])
    assert_bits_equal(shard, {"model.embed_tokens.weight": OLD["model.embed_tokens.weight"]})
    delta = load_safetensors(GOLDEN["golden-delta", "model-00001.safetensors"])
    payload = delta["model.layers.0.input_layernorm.weight"]
    assert payload.dtype == torch.uint8
    assert (
        payload.numpy().tobytes() == NEW["model.layers.0.input_layernorm.weight"].numpy().tobytes()
    )


def test_many_tensors_and_fp8_load_with_the_safetensors_library(tmp_path: Path) -> None:
    weights = {
        "model.layers.3.b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "model.layers.3.a": torch.tensor([0.5, -1.0], dtype=torch.float8_e4m3fn),
        "model.layers.3.c": torch.tensor([2.0], dtype=torch.float8_e5m2),
        "model.layers.3.d": torch.tensor([[3.0]], dtype=torch.float16),
        "model.layers.3.e": torch.zeros(0, dtype=torch.bfloat16),
    }
    write_base(tmp_path, "b", weights, config={})
    loaded = load_safetensors((tmp_path / "b" / "model-00004.safetensors").read_bytes())
    assert_bits_equal(loaded, weights)


# --- FORMAT.md §9: a tensor stored in pieces (one per rank) ---------------------

EMBED = "model.embed_tokens.weight"
# Rank r's box of EMBED is row r: the base piece files, and the `full` delta's.
PIECE_GOLDEN: dict[str, bytes] = {
    "base/model-00000.r00000.safetensors": bytes.fromhex(
        "80000000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a2277656967"
        "687473796e632d7069656365227d2c226d6f64656c2e656d6265645f746f6b656e732e776569"
        "676874223a7b226474797065223a2242463136222c227368617065223a5b312c325d2c226461"
        "74615f6f666673657473223a5b302c345d7d7d2020803f00c0"
    ),
    "base/model-00000.r00001.safetensors": bytes.fromhex(
        "80000000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a2277656967"
        "687473796e632d7069656365227d2c226d6f64656c2e656d6265645f746f6b656e732e776569"
        "676874223a7b226474797065223a2242463136222c227368617065223a5b312c325d2c226461"
        "74615f6f666673657473223a5b302c345d7d7d2020003f0000"
    ),
    "delta/model-00000.r00001.safetensors": bytes.fromhex(
        "98000000000000007b225f5f6d657461646174615f5f223a7b22636f6d7072657373696f6e5f66"
        "6f726d6174223a2266756c6c222c22666f726d6174223a2277656967687473796e632d64656c"
        "7461227d2c226d6f64656c2e656d6265645f746f6b656e732e776569676874223a7b22647479"
        "7065223a225538222c227368617065223a5b345d2c22646174615f6f666673657473223a5b30"
        "2c345d7d7d2020003f803f"
    ),
}
PIECES_DOC = b"""      "pieces": [
        {
          "file": "model-00000.r00000.safetensors",
          "offset": [
            0,
            0
          ],
          "shape": [
            1,
            2
          ]
        },
        {
          "file": "model-00000.r00001.safetensors",
          "offset": [
            1,
            0
          ],
          "shape": [
            1,
            2
          ]
        }
      ]
"""


def _pieced_snapshot(
    root: Path,
    identity: str,
    kind: str,
    files: dict[str, bytes],
    codec: str = "full",
    target: torch.Tensor | None = None,
) -> bytes:
    """Write a two-piece snapshot of EMBED by hand (what two ranks write) and its manifest."""
    from weightsync.codec import checksum_bytes, checksum_tensor
    from weightsync.snapshot.manifest import FileEntry, Manifest, Piece, TensorEntry

    (root / identity).mkdir(parents=True)
    for name, data in files.items():
        (root / identity / name).write_bytes(data)
    if target is None:
        target = (OLD if kind == "base" else NEW)[EMBED]
    width = int(target.shape[1])
    pieces = tuple(
        Piece(file=f"model-00000.r{r:05d}.safetensors", offset=(r, 0), shape=(1, width))
        for r in (0, 1)
    )
    manifest = Manifest(
        format_version=2,
        identity=identity,
        kind="base" if kind == "base" else "delta",
        parent=None if kind == "base" else "pieces-base",
        base="pieces-base",
        compression_format=None if kind == "base" else codec,
        checksum_format="xxh3_64",
        tensors={
            EMBED: TensorEntry(
                shape=(2, width),
                dtype="BF16",
                file=pieces[0].file,
                checksum=checksum_tensor("xxh3_64", target),
                num_changed=None if kind == "base" else 1,
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
    data = manifest.to_json_bytes()
    (root / identity / "weightsync.json").write_bytes(data)
    return data


def test_piece_files_and_the_pieces_field_match_the_golden_bytes() -> None:
    from weightsync.snapshot.pieces import encode_base_pieces, encode_delta_pieces

    old, new = OLD[EMBED], NEW[EMBED]
    for r in (0, 1):
        base = encode_base_pieces({EMBED: old[r : r + 1].contiguous()})
        assert base == PIECE_GOLDEN[f"base/model-00000.r{r:05d}.safetensors"]
    delta, changed = encode_delta_pieces(
        {EMBED: old[1:2].contiguous()}, {EMBED: new[1:2].contiguous()}, compression_format="full"
    )
    assert delta == PIECE_GOLDEN["delta/model-00000.r00001.safetensors"]
    assert changed == {EMBED: 1}


def test_a_pieced_base_and_delta_read_back_as_whole_tensors(tmp_path: Path) -> None:
    from weightsync.codec.bits import bits
    from weightsync.snapshot.pieces import encode_delta_pieces

    base_files = {n.split("/")[1]: d for n, d in PIECE_GOLDEN.items() if n.startswith("base/")}
    manifest = _pieced_snapshot(tmp_path, "pieces-base", "base", base_files)
    assert manifest.startswith(b'{\n  "format_version": 2,\n')
    assert PIECES_DOC in manifest
    row0, _ = encode_delta_pieces(
        {EMBED: OLD[EMBED][:1].contiguous()},
        {EMBED: NEW[EMBED][:1].contiguous()},
        compression_format="full",
    )
    delta_files = {
        "model-00000.r00000.safetensors": row0,
        "model-00000.r00001.safetensors": PIECE_GOLDEN["delta/model-00000.r00001.safetensors"],
    }
    _pieced_snapshot(tmp_path, "pieces-delta", "delta", delta_files)
    store = SnapshotStore(tmp_path)
    assert_bits_equal(store.materialize("pieces-base"), {EMBED: OLD[EMBED]})
    assert_bits_equal(store.materialize("pieces-delta"), {EMBED: NEW[EMBED]})
    # The load pipeline's view: one whole-tensor patch (dense: `full` pieces are dense).
    patch = store.fetch("pieces-delta").patches({EMBED: OLD[EMBED].clone()})[EMBED]
    assert patch.positions is None
    assert patch.values.tolist() == bits(NEW[EMBED]).reshape(-1).tolist()
    # Sparse pieces (wsdelta1): positions in the whole tensor, not in the piece.
    wide_old = torch.zeros(2, 256, dtype=torch.bfloat16)
    wide_new = wide_old.clone()
    wide_new[1, 5] = 1.0
    wide_new[0, 200] = -1.0
    sparse = {
        f"model-00000.r{r:05d}.safetensors": encode_delta_pieces(
            {EMBED: wide_old[r : r + 1].contiguous()},
            {EMBED: wide_new[r : r + 1].contiguous()},
            compression_format="wsdelta1",
        )[0]
        for r in (0, 1)
    }
    _pieced_snapshot(tmp_path, "sparse", "delta", sparse, codec="wsdelta1", target=wide_new)
    patch = SnapshotStore(tmp_path).fetch("sparse").patches({EMBED: wide_old.clone()})[EMBED]
    assert patch.positions is not None and patch.positions.tolist() == [200, 256 + 5]
    patched = wide_old.clone()
    patch.apply_(patched)
    assert_bits_equal({EMBED: patched}, {EMBED: wide_new})


def test_pieces_that_overlap_leave_a_gap_or_lack_version_2_are_refused() -> None:
    import json

    from weightsync.errors import SnapshotCorruptError
    from weightsync.snapshot.manifest import Manifest

    def doc(pieces: list[dict[str, object]], version: int = 2) -> bytes:
        files = {p["file"]: {"size_bytes": 1, "checksum": "0"} for p in pieces}
        return json.dumps(
            {
                "format_version": version,
                "identity": "p",
                "kind": "base",
                "parent": None,
                "base": "p",
                "compression_format": None,
                "checksum_format": "xxh3_64",
                "session_id": None,
                "created_at": "",
                "stats": {},
                "files": files,
                "tensors": {
                    EMBED: {
                        "shape": [2, 2],
                        "dtype": "BF16",
                        "file": pieces[0]["file"],
                        "checksum": "0",
                        "pieces": pieces,
                    }
                },
            }
        ).encode()

    row = [{"file": f"r{r}", "offset": [r, 0], "shape": [1, 2]} for r in (0, 1)]
    Manifest.from_json_bytes(doc(row), identity="p")  # the two rows tile the tensor
    cases = {
        "overlap": [row[0], {"file": "r1", "offset": [0, 1], "shape": [2, 1]}],
        "do not cover": [row[0]],
        "not a box inside": [row[0], {"file": "r1", "offset": [1, 1], "shape": [1, 2]}],
    }
    for match, pieces in cases.items():
        with pytest.raises(SnapshotCorruptError, match=match):
            Manifest.from_json_bytes(doc(pieces), identity="p")
    with pytest.raises(SnapshotCorruptError, match="stores tensors in pieces"):
        Manifest.from_json_bytes(doc(row, version=1), identity="p")
