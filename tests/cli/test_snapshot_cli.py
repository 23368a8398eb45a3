"""`weightsync snapshot` through Typer's runner, against real snapshots in tmp_path and S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import weightsync.cli.snapshot  # noqa: F401  (registers the `snapshot` sub-app)
from weightsync.cli import app
from weightsync.codec import DEFAULT_CODEC
from weightsync.codec.bits import bits
from weightsync.snapshot import SnapshotStore, write_base, write_delta
from weightsync.storage import open_storage
from weightsync.toymodel import build_model, model_config

pytestmark = pytest.mark.timeout(120)

runner = CliRunner()


def _weights(seed: int) -> dict[str, torch.Tensor]:
    model = build_model("tiny", seed=0)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = param.detach().to(torch.bfloat16)
        if seed:
            mask = torch.rand(t.shape, generator=gen) < 0.2
            t = torch.where(mask, (t.float() * 1.01).to(torch.bfloat16), t)
        out[name] = t.contiguous()
    return out


def _write_chain(storage: Any) -> dict[str, dict[str, torch.Tensor]]:
    w0, w1 = _weights(0), _weights(1)
    base = write_base(storage, "base-1", w0, config=model_config("tiny"))
    write_delta(storage, "delta-1", parent=base, old=w0, new=w1)
    return {"base-1": w0, "delta-1": w1}


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    weights = _write_chain(tmp_path / "store")
    (tmp_path / "store" / "half-written").mkdir()
    return tmp_path / "store", weights


def test_list(root: tuple[Path, Any]) -> None:
    path, _ = root
    result = runner.invoke(app, ["snapshot", "list", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["identity"] for r in rows] == ["base-1", "delta-1"]
    assert rows[1]["kind"] == "delta" and rows[1]["parent"] == "base-1"
    table = runner.invoke(app, ["snapshot", "list", str(path)])
    assert table.exit_code == 0 and "delta-1" in table.stdout and "half-written" not in table.stdout


def test_inspect(root: tuple[Path, Any]) -> None:
    path, weights = root
    result = runner.invoke(app, ["snapshot", "inspect", str(path), "delta-1", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "delta" and info["chain"] == ["base-1", "delta-1"]
    assert info["compression_format"] == DEFAULT_CODEC
    by_name = {t["name"]: t for t in info["tensors"]}
    name = "model.layers.0.mlp.up_proj.weight"
    expected = int((bits(weights["base-1"][name]) != bits(weights["delta-1"][name])).sum())
    assert by_name[name]["num_changed"] == expected > 0
    assert 0 < by_name[name]["payload_bytes"] <= info["stats"]["payload_bytes"]
    human = runner.invoke(app, ["snapshot", "inspect", str(path), "delta-1"])
    assert human.exit_code == 0 and "base-1 -> delta-1" in human.stdout


def test_inspect_detailed_uses_change_stats(root: tuple[Path, Any]) -> None:
    pytest.importorskip("weightsync.codec.stats")
    path, _ = root
    result = runner.invoke(
        app, ["snapshot", "inspect", str(path), "delta-1", "--json", "--detailed"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["tensors"]
    assert all(r["change_stats"]["num_changed"] == r["num_changed"] for r in rows)


def test_verify_ok_and_corrupt(root: tuple[Path, Any]) -> None:
    path, _ = root
    ok = runner.invoke(app, ["snapshot", "verify", str(path), "delta-1", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["ok"] and report["chain"] == ["base-1", "delta-1"]
    shard = path / "base-1" / "model-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["snapshot", "verify", str(path), "delta-1"])
    assert bad.exit_code == 1
    assert "'base-1', file 'model-00002.safetensors'" in bad.output


def test_materialize(root: tuple[Path, Any], tmp_path: Path) -> None:
    path, weights = root
    out = tmp_path / "hf"
    result = runner.invoke(app, ["snapshot", "materialize", str(path), "delta-1", str(out)])
    assert result.exit_code == 0, result.output
    materialized = SnapshotStore(tmp_path).storage.read_bytes("hf/config.json")
    assert json.loads(materialized)["num_hidden_layers"] == 2
    from safetensors.torch import load_file

    shard = load_file(out / "model-00001.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(shard[name].view(torch.int16), weights["delta-1"][name].view(torch.int16))


def test_errors_exit_1_with_the_message(root: tuple[Path, Any]) -> None:
    path, _ = root
    missing = runner.invoke(app, ["snapshot", "inspect", str(path), "half-written"])
    assert missing.exit_code == 1
    assert "no manifest" in missing.output
    bad_identity = runner.invoke(app, ["snapshot", "verify", str(path), "../x"])
    assert bad_identity.exit_code == 1 and "path separator" in bad_identity.output


def test_usage_errors_exit_2(root: tuple[Path, Any]) -> None:
    path, _ = root
    assert runner.invoke(app, ["snapshot", "inspect", str(path)]).exit_code == 2
    assert runner.invoke(app, ["snapshot", "list", str(path), "--bogus"]).exit_code == 2


def test_s3_storage_with_endpoint_option(
    s3_bucket_url: str, s3_storage_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_chain(open_storage(s3_bucket_url, **s3_storage_options))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_storage_options["secret"])
    endpoint = s3_storage_options["client_kwargs"]["endpoint_url"]
    result = runner.invoke(
        app, ["snapshot", "verify", s3_bucket_url, "delta-1", "--json", "--endpoint-url", endpoint]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"]
