"""`weightsync deploy` through Typer's runner against a real deployment."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

import weightsync.cli.deploy  # noqa: F401  (registers the `deploy` group)
from _support.deployments import API_KEY
from weightsync.cli import app

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def runner():
    return CliRunner()


def _run(runner, *args, key=API_KEY):
    # A wide terminal, so rich tables do not fold identities across lines.
    env = {"WEIGHTSYNC_API_KEY": key or "", "COLUMNS": "200"}
    return runner.invoke(app, ["deploy", *args], env=env)


def test_status_hotload_ledger_round_trip(runner, deployment, snapshots):
    url = deployment.url
    result = _run(runner, "hotload", url, snapshots.base2, "--wait", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["identity"] == snapshots.base2

    result = _run(runner, "status", url, "--json")
    assert result.exit_code == 0, result.output
    [replica] = json.loads(result.output)["replicas"]
    assert replica["current_snapshot_identity"] == snapshots.base2 and replica["readiness"]

    table = _run(runner, "status", url)
    assert table.exit_code == 0 and snapshots.base2 in table.output

    result = _run(runner, "ledger", url, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)[-1]["identity"] == snapshots.base2
    assert snapshots.base2 in _run(runner, "ledger", url).output

    assert _run(runner, "ledger", url, "--reset").exit_code == 0
    assert json.loads(_run(runner, "ledger", url, "--json").output) == []


def test_delta_with_previous_and_refusal_exit_codes(runner, deployment, snapshots, manager):
    url = deployment.url
    assert _run(runner, "hotload", url, snapshots.base, "--wait").exit_code == 0
    delta = snapshots.deltas[0]
    meta = snapshots.metadata(delta)
    args = [
        "hotload", url, delta,
        "--previous", meta["previous_snapshot_identity"],
        "--compression-format", meta["compression_format"],
        "--checksum-format", meta["checksum_format"],
    ]  # fmt: skip
    result = _run(runner, *args, "--wait")
    assert result.exit_code == 0, result.output
    assert f"serving {delta} on every replica" in result.output
    # The same delta onto a parent that is not served: refused, exit 1, reason printed.
    wrong = _run(runner, "hotload", url, snapshots.deltas[1], "--previous", "nope")
    assert wrong.exit_code == 1
    assert "HTTP 409" in wrong.output and snapshots.deltas[1] in wrong.output


def test_auth_and_unreachable_errors_exit_1(runner, deployment):
    result = _run(runner, "status", deployment.url, key=None)
    assert result.exit_code == 1 and "HTTP 401" in result.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run(runner, "status", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1 and f"127.0.0.1:{port}" in result.output


def test_bad_options_are_usage_errors(runner, deployment):
    result = _run(runner, "hotload", deployment.url, "x", "--compression-format", "full")
    assert result.exit_code == 2 and "--previous" in result.output


def test_list_and_stop_local_deployments(runner, deployment, registry_dir):
    result = runner.invoke(app, ["deploy", "list", "--registry-dir", str(registry_dir), "--json"])
    assert result.exit_code == 0
    listed = {d["deployment_id"]: d for d in json.loads(result.output)}
    assert listed["main"]["state"] == "running" and listed["main"]["url"] == deployment.url
    result = runner.invoke(app, ["deploy", "stop", "ghost", "--registry-dir", str(registry_dir)])
    assert result.exit_code == 1 and "no local deployment 'ghost'" in result.output
