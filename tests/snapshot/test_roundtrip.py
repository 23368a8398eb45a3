"""Writing and reading bases and deltas: layout, manifest, bit-exact chains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _support.bits import assert_bits_equal
from _support.models import toy_weights
from _support.weights import perturb
from weightsync.codec import list_codecs
from weightsync.snapshot import (
    CONFIG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    SPEC_FILE,
    SnapshotStore,
    write_base,
    write_delta,
)
from weightsync.toymodel import build_tokenizer

pytestmark = pytest.mark.timeout(120)

DTYPES = {
    "bf16": {"*": torch.bfloat16},
    "fp32": {"*": torch.float32},
    # Norms in fp32, the rest bf16, one tensor fp16: what mixed-precision exports look like.
    "mixed": {"*": torch.bfloat16, "norm": torch.float32, "embed": torch.float16},
}


def mixed_weights(kind: str) -> dict[str, torch.Tensor]:
    table = DTYPES[kind]
    out = {}
    for name, t in toy_weights(torch.float32).items():
        dtype = next((d for key, d in table.items() if key != "*" and key in name), table["*"])
        out[name] = t.to(dtype)
    return out


def test_base_layout_is_hugging_face_with_one_layer_per_shard(
    tmp_path: Path, tiny_config: object
) -> None:
    weights = toy_weights()
    tok = build_tokenizer(tmp_path / "tok")
    manifest = write_base(
        tmp_path / "store", "base-1", weights, config=tiny_config, tokenizer_dir=tok
    )
    snap = tmp_path / "store" / "base-1"
    names = sorted(p.name for p in snap.iterdir())
    assert names == sorted(
        [
            CONFIG_FILE,
            INDEX_FILE,
            SPEC_FILE,
            MANIFEST_FILE,
            "model-00000.safetensors",
            "model-00001.safetensors",
            "model-00002.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    weight_map = json.loads((snap / INDEX_FILE).read_text())["weight_map"]
    assert weight_map["model.layers.0.mlp.up_proj.weight"] == "model-00001.safetensors"
    assert weight_map["model.layers.1.self_attn.q_proj.weight"] == "model-00002.safetensors"
    assert weight_map["model.embed_tokens.weight"] == "model-00000.safetensors"
    assert weight_map["model.norm.weight"] == "model-00000.safetensors"
    assert sorted(weight_map) == sorted(weights)
    spec = json.loads((snap / SPEC_FILE).read_text())["tensor_map"]
    assert spec["model.embed_tokens.weight"] == {"shape": [128, 32], "dtype": "BF16"}
    assert json.loads((snap / CONFIG_FILE).read_text())["num_hidden_layers"] == 2
    assert manifest.kind == "base" and manifest.base == "base-1" and manifest.parent is None
    assert set(manifest.files) == set(names) - {MANIFEST_FILE}
    assert manifest.stats["full_bytes"] == sum(t.numel() * 2 for t in weights.values())
    assert manifest.stats["num_elements"] == sum(t.numel() for t in weights.values())
    store = SnapshotStore(tmp_path / "store")
    assert store.read_manifest("base-1") == manifest
    assert store.local_tokenizer_dir("base-1") == snap


@pytest.mark.parametrize("kind", sorted(DTYPES))
def test_base_round_trip_is_bit_exact(tmp_path: Path, tiny_config: object, kind: str) -> None:
    weights = mixed_weights(kind)
    write_base(tmp_path, "b", weights, config=tiny_config, session_id="0123abcd")
    store = SnapshotStore(tmp_path)
    fetched = store.fetch("b")
    assert fetched.manifest.session_id == "0123abcd"
    assert_bits_equal(fetched.tensors(), weights)
    assert_bits_equal(store.materialize("b"), weights)


@pytest.mark.parametrize("codec", list_codecs())
@pytest.mark.parametrize("kind", sorted(DTYPES))
def test_chain_of_deltas_materializes_bit_exactly(
    tmp_path: Path, tiny_config: object, kind: str, codec: str
) -> None:
    store = SnapshotStore(tmp_path)
    steps = [mixed_weights(kind)]
    manifests = [write_base(store.storage, "s0", steps[0], config=tiny_config)]
    for i in range(1, 5):
        steps.append(perturb(steps[-1], seed=i))
        manifests.append(
            write_delta(
                store.storage,
                f"s{i}",
                parent=manifests[-1],
                old=steps[-2],
                new=steps[-1],
                compression_format=codec,
            )
        )
    assert store.list_snapshots() == ["s0", "s1", "s2", "s3", "s4"]
    assert [m.identity for m in store.chain("s4")] == ["s0", "s1", "s2", "s3", "s4"]
    for i in (1, 4):
        assert_bits_equal(store.materialize(f"s{i}"), steps[i])
    last = manifests[-1]
    assert last.kind == "delta" and last.parent == "s3" and last.base == "s0"
    assert last.compression_format == codec
    # Delta side files are byte-identical to the base's.
    for name in (CONFIG_FILE, INDEX_FILE, SPEC_FILE):
        assert (tmp_path / "s4" / name).read_bytes() == (tmp_path / "s0" / name).read_bytes()
    changed = sum(
        int((a.view(torch.uint8) != b.view(torch.uint8)).view(-1, a.element_size()).any(1).sum())
        for a, b in zip(steps[3].values(), steps[4].values(), strict=True)
    )
    assert last.stats["num_changed"] == changed > 0
    assert last.stats["payload_bytes"] == sum(
        (tmp_path / "s4" / f).stat().st_size for f in {e.file for e in last.tensors.values()}
    )
    report = store.verify("s4")
    assert report.ok and report.chain == ["s0", "s1", "s2", "s3", "s4"]
    assert report.tensors_checked == len(steps[0])


@pytest.mark.parametrize("codec", list_codecs())
def test_patches_apply_in_place_and_verify(tmp_path: Path, tiny_config: object, codec: str) -> None:
    old = toy_weights()
    new = perturb(old, seed=7)
    store = SnapshotStore(tmp_path)
    base = write_base(tmp_path, "b", old, config=tiny_config)
    write_delta(tmp_path, "d", parent=base, old=old, new=new, compression_format=codec)
    fetched = store.fetch("d")
    assert fetched.manifest.kind == "delta"
    live = {k: v.clone() for k, v in old.items()}
    patches = fetched.patches(live)
    assert sorted(patches) == sorted(old)
    for name, patch in patches.items():
        fetched.verify_patched(name, live, patch)
    assert_bits_equal(live, old)  # patches() and verify_patched() only read `live`
    undos = {name: patch.apply_(live[name]) for name, patch in patches.items()}
    assert_bits_equal(live, new)
    for name, undo in undos.items():
        undo.apply_(live[name])
    assert_bits_equal(live, old)


def test_unchanged_delta_records_zero_changes(tmp_path: Path, tiny_config: object) -> None:
    weights = toy_weights()
    base = write_base(tmp_path, "b", weights, config=tiny_config)
    delta = write_delta(tmp_path, "d", parent=base, old=weights, new=weights)
    assert delta.stats["num_changed"] == 0
    assert all(e.num_changed == 0 for e in delta.tensors.values())
    assert all(delta.tensors[n].checksum == base.tensors[n].checksum for n in weights)
    assert_bits_equal(SnapshotStore(tmp_path).materialize("d"), weights)


def test_read_config_and_snapshot_url(tmp_path: Path, tiny_config: object) -> None:
    write_base(tmp_path, "b", toy_weights(), config={"model_type": "qwen3", "x": 1})
    store = SnapshotStore(tmp_path)
    assert store.read_config("b") == {"model_type": "qwen3", "x": 1}
    assert store.snapshot_url("b") == (tmp_path / "b").as_posix()
    assert store.exists("b") and not store.exists("c")
    assert store.local_tokenizer_dir("b") is None
