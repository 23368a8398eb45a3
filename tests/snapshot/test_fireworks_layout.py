"""Fireworks' layouts through `SnapshotStore`: a plain HF directory is a base, a
`delta_compress_dirs` output a delta, both verified by their own checksums; weightsync's
`arc_v1`/`arc_v2` deltas decode with fireworks-delta-compression's `delta_decompress_inplace`.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fireworks_delta_compression import compression as fdc
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import weightsync.cli.snapshot  # noqa: F401  (registers the `snapshot` sub-app)
from _support.bits import assert_bits_equal
from _support.models import toy_weights
from _support.weights import perturb
from weightsync.cli import app
from weightsync.errors import (
    ChainError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    UnsupportedOperationError,
)
from weightsync.server.app import create_app
from weightsync.server.config import ReplicaConfig
from weightsync.server.replica import Replica
from weightsync.server.runner import ServerThread
from weightsync.snapshot import SnapshotStore, write_base, write_delta
from weightsync.snapshot.describe import describe_snapshot
from weightsync.snapshot.fireworks_layout import NO_COMPLETION_MARK
from weightsync.toymodel import build_model, build_tokenizer, save_model_dir

FORMATS = ["arc_v1", "arc_v2", "arc_v3"]


def _hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain HF base, a trained step of it (same names), both as `save_pretrained` writes."""
    work = tmp_path_factory.mktemp("hf")
    model = build_model("tiny", seed=0)
    base = save_model_dir(model, work / "base", tokenizer_dir=build_tokenizer(work / "tok"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.1
            p[mask] = (p.float() * 1.01 + 0.001)[mask].to(p.dtype)
    step = save_model_dir(model, work / "step")
    return {"base": base, "step": step}


def _delta_dir(models: dict[str, Path], out: Path, fmt: str) -> Path:
    with ThreadPoolExecutor(max_workers=1) as pool:
        fdc.delta_compress_dirs(
            str(models["base"]),
            str(models["step"]),
            str(out),
            fmt,
            executor=pool,  # type: ignore[arg-type]  # any Executor works; no subprocesses
        )
    return out


def test_plain_hf_directory_loads_as_a_base(tmp_path: Path, models: dict[str, Path]) -> None:
    shutil.copytree(models["base"], tmp_path / "hf-base")
    store = SnapshotStore(tmp_path)
    manifest = store.read_manifest("hf-base")
    assert manifest.kind == "base" and manifest.base == "hf-base"
    assert manifest.checksum_format == "adler32" and manifest.parent is None
    assert NO_COMPLETION_MARK in manifest.cannot_prove
    assert any("no tensor checksums" in line for line in manifest.cannot_prove)
    expected = _hf_weights(models["base"])
    assert_bits_equal(store.fetch("hf-base").tensors(), expected)
    assert_bits_equal(store.materialize("hf-base"), expected)
    assert store.verify("hf-base").ok
    assert store.read_config("hf-base")["model_type"] == "qwen3"
    assert store.local_tokenizer_dir("hf-base") == tmp_path / "hf-base"
    # Never listed (no manifest), and a change after the first read is caught.
    assert store.list_snapshots() == []
    shard = tmp_path / "hf-base" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=r"'hf-base', file 'model.safetensors'"):
        store.fetch("hf-base")


def test_model_files_in_the_storage_root_are_never_a_snapshot(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    for f in models["base"].iterdir():
        shutil.copy(f, tmp_path / f.name)
    store = SnapshotStore(tmp_path)
    assert store.list_snapshots() == []
    for name in ("model.safetensors", "config.json", "anything"):
        with pytest.raises(SnapshotNotFoundError):
            store.read_manifest(name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_delta_compress_dirs_output_loads_as_a_delta(
    tmp_path: Path, models: dict[str, Path], fmt: str
) -> None:
    shutil.copytree(models["base"], tmp_path / "hf-base")
    _delta_dir(models, tmp_path / "fw-step", fmt)
    store = SnapshotStore(tmp_path)
    with pytest.raises(ChainError, match="previous_snapshot_identity"):
        store.read_manifest("fw-step")  # no parent named, no spec file: shapes unknown
    manifest = store.read_manifest("fw-step", parent="hf-base")
    assert manifest.kind == "delta" and manifest.compression_format == fmt
    assert (manifest.parent, manifest.base) == ("hf-base", "hf-base")
    assert any("'hf-base' is what the hot-load request said" in s for s in manifest.cannot_prove)
    # The parent is remembered: later reads (fetch, chain, materialize) need not repeat it.
    assert [m.identity for m in store.chain("fw-step")] == ["hf-base", "fw-step"]
    assert_bits_equal(store.materialize("fw-step"), _hf_weights(models["step"]))
    assert store.verify("fw-step").ok
    info = describe_snapshot(store, "fw-step")
    assert info["layout"] == "fireworks" and info["cannot_prove"] == list(manifest.cannot_prove)
    assert all(t["payload_bytes"] for t in info["tensors"])


def test_a_spec_file_gives_shapes_without_a_parent(tmp_path: Path, models: dict[str, Path]) -> None:
    base, step = tmp_path / "hf-base", tmp_path / "work" / "step"
    shutil.copytree(models["base"], base)
    shutil.copytree(models["step"], step)
    for d in (base, step):  # Fireworks' own model.weight.spec.json, in both (copied if mutual)
        fdc.ensure_tensor_metas(str(d))
    with ThreadPoolExecutor(max_workers=1) as pool:
        args = (str(base), str(step), str(tmp_path / "d"), "arc_v2")
        fdc.delta_compress_dirs(*args, executor=pool)  # type: ignore[arg-type]
    store = SnapshotStore(tmp_path)
    manifest = store.read_manifest("d")
    assert manifest.kind == "delta" and manifest.parent is None
    assert any("no hot-load request named one" in s for s in manifest.cannot_prove)
    with pytest.raises(ChainError, match="'d'"):
        store.chain("d")
    assert store.read_manifest("d", parent="hf-base").parent == "hf-base"
    assert_bits_equal(store.materialize("d"), _hf_weights(models["step"]))


def _shard_payload_range(path: Path, tensor: str) -> tuple[int, int]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize("fmt", ["arc_v1", "arc_v2"])
def test_a_tampered_delta_is_caught_by_its_adler32(
    tmp_path: Path, models: dict[str, Path], fmt: str
) -> None:
    shutil.copytree(models["base"], tmp_path / "hf-base")
    delta = _delta_dir(models, tmp_path / "fw", fmt)
    shard = delta / "model.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__")
    good = header["__metadata__"][name]
    bad = str((int(good) + 1) % 2**32)
    # Same length keeps the header size; flip the last digit of one tensor's checksum.
    tampered = good[:-1] + bad[-1] if len(bad) == len(good) else bad
    assert len(tampered) == len(good) and tampered != good
    shard.write_bytes(data.replace(f'"{good}"'.encode(), f'"{tampered}"'.encode(), 1))
    store = SnapshotStore(tmp_path)
    store.read_manifest("fw", parent="hf-base")
    with pytest.raises(SnapshotCorruptError, match=rf"'fw', tensor '{name}' fails its adler32"):
        store.materialize("fw")
    # A flipped payload byte is refused too (by the frame or by the checksum).
    shard.write_bytes(data)
    begin, end = _shard_payload_range(shard, name)
    flipped = bytearray(data)
    flipped[(begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotCorruptError):
        _materialize_fresh(tmp_path)  # a new store: the first read sees the flipped byte


def _materialize_fresh(root: Path) -> dict[str, torch.Tensor]:
    store = SnapshotStore(root)
    store.read_manifest("fw", parent="hf-base")
    return store.materialize("fw")


def _weightsync_chain(root: Path, tiny_config: object, fmt: str) -> tuple[Any, Any]:
    w0 = toy_weights()
    w1 = perturb(w0, seed=3)
    base = write_base(root, "b", w0, config=tiny_config)
    delta = write_delta(root, "d", parent=base, old=w0, new=w1, compression_format=fmt)
    return (w0, w1), (base, delta)


@pytest.mark.parametrize("fmt", ["arc_v1", "arc_v2"])
def test_our_fireworks_deltas_decode_with_delta_decompress_inplace(
    tmp_path: Path, tiny_config: object, fmt: str
) -> None:
    (_, w1), (base, delta) = _weightsync_chain(tmp_path / "store", tiny_config, fmt)
    assert delta.checksum_format == "xxh3_64" and delta.compression_format == fmt
    out = tmp_path / "applied"
    out.mkdir()
    for shard in sorted({e.file for e in base.tensors.values()}):
        shutil.copy(tmp_path / "store" / "b" / shard, out / shard)
        fdc.delta_decompress_inplace(
            base_path=str(out / shard),
            diff_path=str(tmp_path / "store" / "d" / shard),
            compression_format=fmt,
        )
    assert_bits_equal(_hf_weights(out), w1)
    assert_bits_equal(SnapshotStore(tmp_path / "store").materialize("d"), w1)


def test_our_arc_v2_shards_equal_theirs(tmp_path: Path, tiny_config: object) -> None:
    (w0, w1), (base, _) = _weightsync_chain(tmp_path / "store", tiny_config, "arc_v2")
    for shard in sorted({e.file for e in base.tensors.values()}):
        ours = (tmp_path / "store" / "d" / shard).read_bytes()
        names = sorted(n for n, e in base.tensors.items() if e.file == shard)
        theirs_path = tmp_path / f"theirs-{shard}"
        fdc.delta_compress_dicts_to_file(
            src={n: w0[n] for n in names},
            dst={n: w1[n] for n in names},
            diff_file=str(theirs_path),
            compression_format="arc_v2",
        )
        theirs = theirs_path.read_bytes()
        # Same header (safetensors orders metadata keys by hash; weightsync sorts them)
        # and the same data bytes.
        n_ours, n_theirs = (int.from_bytes(b[:8], "little") for b in (ours, theirs))
        assert json.loads(ours[8 : 8 + n_ours]) == json.loads(theirs[8 : 8 + n_theirs])
        assert ours[8 + n_ours :] == theirs[8 + n_theirs :]
        if len(names) == 1:
            assert ours == theirs
        with safe_open(str(theirs_path), framework="pt") as f:
            assert f.metadata() == {
                n: str(zlib.adler32(w1[n].view(torch.uint8).numpy())) for n in names
            }


def test_arc_v3_is_refused_for_writing_before_anything_is_written(
    tmp_path: Path, tiny_config: object
) -> None:
    w0 = toy_weights()
    base = write_base(tmp_path, "b", w0, config=tiny_config)
    with pytest.raises(UnsupportedOperationError, match="does not write it"):
        write_delta(
            tmp_path, "d", parent=base, old=w0, new=perturb(w0, seed=1), compression_format="arc_v3"
        )
    assert not (tmp_path / "d").exists()


def test_snapshot_inspect_says_what_the_format_cannot_prove(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    shutil.copytree(models["base"], tmp_path / "hf-base")
    _delta_dir(models, tmp_path / "fw", "arc_v2")
    runner = CliRunner()
    result = runner.invoke(app, ["snapshot", "inspect", str(tmp_path), "hf-base"])
    assert result.exit_code == 0, result.output
    assert "fireworks layout" in result.output and "cannot prove" in result.output
    result = runner.invoke(
        app, ["snapshot", "inspect", str(tmp_path), "fw", "--parent", "hf-base", "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["compression_format"] == "arc_v2" and info["chain"] == ["hf-base", "fw"]
    assert any("hot-load request" in line for line in info["cannot_prove"])
    no_parent = runner.invoke(app, ["snapshot", "inspect", str(tmp_path), "fw"])
    assert no_parent.exit_code == 1 and "--parent" in no_parent.output


def _wait_loaded(client: httpx.Client, identity: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = client.get("/hot_load/v1/models/hot_load").json()["replicas"][0]
        state = status["loading_state"]
        if state["target_snapshot_identity"] == identity and state["stage"] in ("ready", "error"):
            return dict(status)
        time.sleep(0.02)
    raise AssertionError(f"the load of {identity} did not finish")


@contextmanager
def _replica(root: Path, state: Path, snapshot: str) -> Iterator[tuple[httpx.Client, Replica]]:
    replica = Replica(ReplicaConfig(storage=str(root), snapshot=snapshot, state_dir=state))
    replica.start()
    server = ServerThread(create_app(replica))
    try:
        with httpx.Client(base_url=server.start(), timeout=60) as client:
            yield client, replica
    finally:
        server.stop()


def _serves(replica: Replica, expected: dict[str, torch.Tensor]) -> bool:
    live = replica.engine.named_weights()
    return all(
        torch.equal(live[n].view(torch.int16), t.view(torch.int16)) for n, t in expected.items()
    )


@pytest.mark.timeout(180)
def test_a_replica_starts_from_and_hot_loads_plain_hf_bases(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    root = tmp_path / "store"
    shutil.copytree(models["base"], root / "hf-base")
    shutil.copytree(models["step"], root / "hf-step")
    with _replica(root, tmp_path / "state", "hf-base") as (client, replica):
        assert _serves(replica, _hf_weights(models["base"]))
        r = client.post("/hot_load/v1/models/hot_load", json={"identity": "hf-step"})
        assert r.status_code == 200, r.text
        status = _wait_loaded(client, "hf-step")
        assert status["loading_state"]["stage"] == "ready", status
        assert status["current_snapshot_identity"] == "hf-step"
        assert _serves(replica, _hf_weights(models["step"]))


@pytest.mark.timeout(180)
def test_a_replica_hot_loads_fireworks_layouts_bit_exactly(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """The SDK's way: a plain HF base, then a `delta_compress_dirs` arc_v2 delta whose
    parent only the request names, with the SDK's `alder32` spelling."""
    root = tmp_path / "store"
    shutil.copytree(models["base"], root / "hf-base")
    _delta_dir(models, root / "fw-step", "arc_v2")
    with _replica(root, tmp_path / "state", "hf-base") as (client, replica):
        assert _serves(replica, _hf_weights(models["base"]))
        r = client.post(
            "/hot_load/v1/models/hot_load",
            json={
                "identity": "fw-step",
                "incremental_snapshot_metadata": {
                    "previous_snapshot_identity": "hf-base",
                    "compression_format": "arc_v2",
                    "checksum_format": "alder32",
                },
            },
        )
        assert r.status_code == 200, r.text
        status = _wait_loaded(client, "fw-step")
        assert status["loading_state"]["stage"] == "ready", status
        assert _serves(replica, _hf_weights(models["step"]))
        # The status says what the Fireworks layout could not prove about this load.
        assert any("hot-load request" in line for line in status["last_load"]["cannot_prove"])


def test_a_sharded_hf_directory_loads_and_a_missing_shard_is_an_incomplete_write(
    tmp_path: Path,
) -> None:
    model = build_model("tiny", seed=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    store = SnapshotStore(tmp_path)
    manifest = store.read_manifest("sharded")
    assert {e.file for e in manifest.tensors.values()} == {s.name for s in shards}
    assert_bits_equal(store.materialize("sharded"), _hf_weights(tmp_path / "sharded"))
    shards[-1].unlink()
    with pytest.raises(SnapshotNotFoundError, match=r"incomplete.*index names missing files"):
        SnapshotStore(tmp_path).read_manifest("sharded")
