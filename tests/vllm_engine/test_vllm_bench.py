"""`weightsync bench --engine vllm`: the vLLM column, through the real CLI.

One end-to-end method (the default codec) syncs into a `weightsync serve --engine
vllm` deployment, and the baseline row replays the same recorded step through
vLLM's own `reload_weights` of a full directory. Assertions check the report's
structure and byte counts and that both paths end with the trainer's bits in vLLM —
never timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import weightsync.cli.bench  # noqa: F401  (registers the command)
from weightsync.bench.vllm_reload import METHOD
from weightsync.cli import app
from weightsync.codec import DEFAULT_CODEC

pytest.importorskip("vllm.engine.arg_utils", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def test_bench_vllm_column(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--size", "small", "--engine", "vllm", "--lrs", "1e-4",
            "--steps-per-lr", "1", "--intervals", "1", "--e2e-syncs", "1",
            "--codecs", DEFAULT_CODEC, "--work-dir", str(tmp_path / "work"),
            "--json", str(json_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    rows = {r["method"]: r for r in report["end_to_end"]}
    assert sorted(rows) == sorted({DEFAULT_CODEC, METHOD})
    delta, vllm = rows[DEFAULT_CODEC], rows[METHOD]
    assert delta["lossless"] is True and vllm["lossless"] is True
    assert [s["checkpoint_type"] for s in delta["syncs"]] == ["delta"]
    assert [s["checkpoint_type"] for s in vllm["syncs"]] == ["full-dir"]
    assert vllm["first_sync"]["checkpoint_type"] == "full-dir"
    # Both replayed the same recorded step.
    assert delta["changed_fraction"] == vllm["changed_fraction"] > 0
    # vLLM's path writes every bf16 tensor; the delta carries only the change.
    assert vllm["median_payload_bytes"] >= report["model"]["full_bytes"]
    assert delta["median_payload_bytes"] < vllm["median_payload_bytes"]
    for s in vllm["syncs"]:
        assert s["total_s"] >= s["save_s"] >= 0 and s["total_s"] >= s["pause_s"] > 0
    assert "vs vLLM reload_weights" in result.output
