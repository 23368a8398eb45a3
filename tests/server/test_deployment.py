"""`weightsync serve` as a process: two replicas behind a gateway; a model-dir start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from _support.bits import same_bits
from _support.chain import Chain
from _support.models import toy_model
from _support.serving import PROMPT_IDS, reference_greedy
from weightsync.toymodel import save_model_dir

BASE, D1, D2, D3 = (f"{n}-0badcafe" for n in ("base", "step1", "step2", "step3"))


def _wait_all_ready(client: httpx.Client, identity: str, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = client.get("/hot_load/v1/models/hot_load").json()["replicas"]
        if all(r["current_snapshot_identity"] == identity and r["readiness"] for r in replicas):
            return list(replicas)
        errors = [r for r in replicas if r["loading_state"]["stage"] == "error"]
        assert not errors, errors
        assert time.monotonic() < deadline, replicas
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_two_replicas_behind_a_gateway(chain: Chain, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = dict(os.environ, WEIGHTSYNC_API_KEY="gw-key")
    cmd = [
        sys.executable,
        "-m",
        "weightsync.cli",
        "serve",
        "--storage",
        str(chain.root),
        "--snapshot",
        BASE,
        "--replicas",
        "2",
        "--port",
        "0",
        "--engine-threads",
        "1",
        "--state-dir",
        str(tmp_path / "state"),
        "--ready-file",
        str(ready),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, "weightsync serve exited"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and info["url"].startswith("http://127.0.0.1:")
        client = httpx.Client(
            base_url=info["url"], timeout=60, headers={"authorization": "Bearer gw-key"}
        )
        assert httpx.get(info["url"] + "/health").status_code == 200
        assert httpx.get(info["url"] + "/hot_load/v1/models/hot_load").status_code == 401
        replicas = _wait_all_ready(client, BASE)
        assert [r["replica_id"] for r in replicas] == ["replica-0", "replica-1"]
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        # Each replica is given its typed config as a file, never flags nor the API key.
        for i, child in enumerate(sorted(children, key=lambda c: c.cmdline()[-1])):
            launch_file = tmp_path / "state" / f"replica-{i}" / "launch.json"
            assert child.cmdline()[1:] == ["-m", "weightsync.server", str(launch_file)]
            launch = json.loads(launch_file.read_text())
            assert launch["replica"]["replica_id"] == f"replica-{i}"
            assert launch["replica"]["snapshot"] == BASE and launch["parent_pid"] == proc.pid
            assert launch["replica"]["api_key"] is None and "gw-key" not in launch_file.read_text()
        for parent, identity in ((BASE, D1), (D1, D2)):
            r = client.post(
                "/hot_load/v1/models/hot_load",
                json={
                    "identity": identity,
                    "incremental_snapshot_metadata": {"previous_snapshot_identity": parent},
                },
            )
            assert r.status_code == 200, r.text
            assert [x["status"] for x in r.json()["replicas"]] == ["accepted", "accepted"]
            for rep in _wait_all_ready(client, identity):
                assert rep["last_load"]["pause_s"] > 0
            tokens, _ = reference_greedy(chain.config, chain.weights[identity], PROMPT_IDS, 6)
            for _ in range(2):  # round robin: both replicas answer
                out = client.post(
                    "/v1/completions",
                    json={
                        "prompt": PROMPT_IDS,
                        "max_tokens": 6,
                        "temperature": 0,
                        "return_token_ids": True,
                    },
                ).json()
                assert out["choices"][0]["token_ids"] == tokens
                assert out["snapshot_identity"] == identity
        refused = client.post(
            "/hot_load/v1/models/hot_load",
            json={
                "identity": D3,
                "incremental_snapshot_metadata": {"previous_snapshot_identity": D1},
            },
        )
        assert refused.status_code == 409
        assert "replica-0" in refused.json()["error"]["message"]
        _wait_all_ready(client, D2)
        ledgers = client.get("/hot_load/v1/ledger").json()["replicas"]
        assert [[e["identity"] for e in x["entries"]] for x in ledgers] == [[BASE, D1, D2]] * 2
        assert "weightsync_http_requests_total" in client.get("/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit.
    assert proc.returncode in (0, -signal.SIGTERM)
    for child in children:
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(child.pid).wait(30)


@pytest.mark.timeout(90)
def test_start_from_a_model_directory(serve, chain: Chain, tmp_path: Path, tokenizer_dir) -> None:
    model_dir = save_model_dir(toy_model(), tmp_path / "hf-model", tokenizer_dir=tokenizer_dir)
    client, replica = serve(snapshot=None, model_dir=model_dir, snapshot_name=BASE)
    live = replica.engine.named_weights()
    assert all(same_bits(live[n], t) for n, t in chain.weights[BASE].items())
    r = client.post("/hot_load/v1/models/hot_load", json={"identity": D1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while (
        client.get("/hot_load/v1/models/hot_load").json()["replicas"][0][
            "current_snapshot_identity"
        ]
        != D1
    ):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    out = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    assert out.status_code == 200 and out.json()["snapshot_identity"] == D1
    ledger = client.get("/hot_load/v1/ledger").json()["replicas"][0]["entries"]
    assert ledger[0]["source"] == str(model_dir.resolve())
