"""`weightsync_verify_failures` counts loads refused for a checksum mismatch, by error type:
an error whose text only mentions a checksum is not one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _support.chain import SESSION, Chain
from _support.models import snapshot_tensors, toy_model
from _support.serving import hot_load, wait_loaded
from weightsync.snapshot.writer import write_base

BASE, D1 = f"base-{SESSION}", f"step1-{SESSION}"
pytestmark = pytest.mark.timeout(120)


def _verify_failures(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("weightsync_verify_failures_total"):
            return float(line.split()[-1])
    raise AssertionError("no weightsync_verify_failures_total in /metrics")


def test_only_checksum_mismatches_count_as_verify_failures(
    serve, chain: Chain, tmp_path: Path
) -> None:
    assert chain.tokenizer_dir is not None
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(chain.tokenizer_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    bad_base = f"badtok-{SESSION}"
    write_base(
        chain.root, bad_base, snapshot_tensors(toy_model(seed=4)), config=chain.config,
        tokenizer_dir=broken,
    )  # fmt: skip
    client, _ = serve()
    assert _verify_failures(client) == 0.0

    assert hot_load(client, bad_base).status_code == 200
    status = wait_loaded(client, bad_base)
    error = status["loading_state"]["error"]
    assert status["loading_state"]["stage"] == "error"
    # Its checksum matches (the message says so): saved broken, not a verify failure.
    assert "tokenizer.json" in error and "checksum matches" in error
    assert _verify_failures(client) == 0.0

    shard = next(f for f in chain.manifests[D1].files if f.endswith(".safetensors"))
    path = chain.root / D1 / shard
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    assert hot_load(client, D1, BASE).status_code == 200
    status = wait_loaded(client, D1)
    assert status["loading_state"]["stage"] == "error"
    assert "fails its" in status["loading_state"]["error"]
    assert _verify_failures(client) == 1.0
