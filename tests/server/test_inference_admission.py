"""Inference cannot starve or burn a replica: bounded queue (429), token budget (400),
cancellation when the client goes away, control routes answered under a flood."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from _support.serving import PROMPT_IDS, wait_loaded
from weightsync.server.inference_admission import InferenceLimits

BASE, D1 = "base-0badcafe", "step1-0badcafe"
pytestmark = pytest.mark.timeout(180)


def metric(client: httpx.Client, name: str, labels: str = "") -> float:
    """One sample of the replica's Prometheus metrics (0 when not exported yet)."""
    text = client.get("/metrics").text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class HeldStream:
    """A streamed completion read in a thread until `release()`; then the client hangs up."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.started = threading.Event()
        self._release = threading.Event()
        self.chunks = 0
        self._thread = threading.Thread(target=self._run, args=(url, body))
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        with (
            httpx.Client(base_url=url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data:"):
                    self.chunks += 1
                    self.started.set()
                    if self._release.is_set():
                        break  # leaving the block closes the connection mid-stream

    def release(self) -> None:
        self._release.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


LONG = {"prompt": PROMPT_IDS, "max_tokens": 2000, "temperature": 0, "stop_token_ids": []}


def test_a_full_queue_answers_429_with_retry_after(serve) -> None:
    client, _ = serve(inference=InferenceLimits(workers=1, max_queued=0))
    url = str(client.base_url).rstrip("/")
    held = HeldStream(url, LONG)
    assert held.started.wait(60)
    for body in ({"prompt": [1, 2], "max_tokens": 1}, {"prompt": [1, 2], "stream": True}):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "queue is full" in r.json()["error"]["message"]
    assert metric(client, "weightsync_inference_refused_total", '{reason="queue_full"}') == 2
    held.release()
    # The held request is cancelled when its client hangs up, which frees its place.
    wait_for(lambda: metric(client, "weightsync_inference_running") == 0, "the worker to free")
    ok = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_a_request_over_the_token_budget_is_refused_with_how_to_split(serve) -> None:
    client, _ = serve(inference=InferenceLimits(max_request_tokens=1000))
    body = {"prompt": [PROMPT_IDS] * 4, "n": 2, "max_tokens": 200}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "1600 tokens" in message and "limit per request is 1000" in message
    assert "at most 2 prompts" in message
    # Two prompts fit: the split it suggests is admitted.
    split = client.post("/v1/completions", json={**body, "prompt": [PROMPT_IDS] * 2})
    assert split.status_code == 200, split.text
    # max_tokens counts as at most the model's context (2048): 50 x 16 x 1e9 -> 50 x 16 x 2048.
    huge = client.post(
        "/v1/completions", json={"prompt": [PROMPT_IDS] * 50, "n": 16, "max_tokens": 10**9}
    )
    assert huge.status_code == 400 and "1638400 tokens" in huge.json()["error"]["message"]
    assert "lower max_tokens to at most 62" in huge.json()["error"]["message"]
    assert metric(client, "weightsync_inference_refused_total", '{reason="token_budget"}') == 2


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "sse"])
def test_a_disconnected_clients_generation_stops(serve, streaming: bool) -> None:
    client, _ = serve()
    # 8 prompts x n 16 x 500 tokens: minutes of work on this model if nobody stopped it.
    body = {"prompt": [PROMPT_IDS] * 8, "n": 16, "max_tokens": 500, "temperature": 0.8}
    requested = 8 * 16 * 500
    before = metric(client, "weightsync_generated_tokens_total")
    if streaming:
        held = HeldStream(str(client.base_url).rstrip("/"), body)
        assert held.started.wait(60)
        held.release()
    else:
        where = urlsplit(str(client.base_url))
        conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=60)
        conn.request(
            "POST", "/v1/completions", body=json.dumps(body),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        wait_for(
            lambda: metric(client, "weightsync_generated_tokens_total") > before + 10,
            "the generation to start",
        )
        conn.close()  # the client goes away without reading the answer
    wait_for(lambda: metric(client, "weightsync_inference_running") == 0, "the generation to stop")
    assert metric(client, "weightsync_inference_cancelled_total") == 1
    stopped_at = metric(client, "weightsync_generated_tokens_total")
    assert stopped_at - before < requested
    # Nothing generates any more: one more 1-token request adds exactly one token.
    one = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1})
    assert one.status_code == 200, one.text
    assert metric(client, "weightsync_generated_tokens_total") == stopped_at + 1


def test_control_routes_answer_while_200_completions_are_in_flight(serve, chain) -> None:
    client, _ = serve()
    url = str(client.base_url).rstrip("/")
    body = {"prompt": PROMPT_IDS, "max_tokens": 300, "temperature": 0.8, "stream": True}

    async def one(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    async def flood() -> dict[str, int]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            tasks = [asyncio.create_task(one(http)) for _ in range(200)]
            answers: dict[str, int] = {}
            try:

                def admitted() -> float:
                    return metric(client, "weightsync_inference_running") + metric(
                        client, "weightsync_inference_queued"
                    )

                await asyncio.to_thread(wait_for, lambda: admitted() >= 190, "200 in flight")
                async with httpx.AsyncClient(base_url=url, timeout=60) as control:
                    for path in ("/health", "/hot_load/v1/models/hot_load", "/hot_load/v1/ledger"):
                        answers[path] = (await control.get(path)).status_code
                    answers["POST hot_load"] = (
                        await control.post(
                            "/hot_load/v1/models/hot_load",
                            json={
                                "identity": D1,
                                "incremental_snapshot_metadata": {
                                    "previous_snapshot_identity": BASE
                                },
                            },
                        )
                    ).status_code
                    answers["in flight"] = int(admitted())
            finally:
                for task in tasks:
                    task.cancel()  # every client hangs up
                await asyncio.gather(*tasks, return_exceptions=True)
            return answers

    answers = asyncio.run(flood())
    assert answers["in flight"] >= 150, answers  # the answers came while the flood was queued
    assert {k: v for k, v in answers.items() if k != "in flight"} == {
        "/health": 200,
        "/hot_load/v1/models/hot_load": 200,
        "/hot_load/v1/ledger": 200,
        "POST hot_load": 200,
    }
    assert wait_loaded(client, D1)["loading_state"]["stage"] == "ready"
    wait_for(
        lambda: (
            metric(client, "weightsync_inference_running") == 0
            and metric(client, "weightsync_inference_queued") == 0
        ),
        "the abandoned requests to drain",
    )


def test_the_gateway_skips_full_replicas_and_passes_hang_ups_on(serve, tmp_path) -> None:
    from weightsync.server.gateway import create_gateway_app
    from weightsync.server.runner import ServerThread

    limits = InferenceLimits(workers=1, max_queued=0)
    replicas = [
        serve(inference=limits, state_dir=tmp_path / f"state-{i}", replica_id=f"replica-{i}")[0]
        for i in range(2)
    ]
    urls = [str(c.base_url).rstrip("/") for c in replicas]
    with ServerThread(create_gateway_app(urls, api_key=None, max_body_bytes=1 << 20)) as gateway:
        small = {"prompt": [1, 2], "max_tokens": 1}
        # One replica full: the gateway answers from the other.
        held = HeldStream(urls[0], LONG)
        assert held.started.wait(60)
        for _ in range(2):  # round robin would pick the full one once
            r = httpx.post(f"{gateway}/v1/completions", json=small, timeout=60)
            assert r.status_code == 200, r.text
        # Both full: 429 with the replica's Retry-After.
        other = HeldStream(urls[1], LONG)
        assert other.started.wait(60)
        r = httpx.post(f"{gateway}/v1/completions", json=small, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        held.release()
        other.release()
        for c in replicas:
            wait_for(lambda c=c: metric(c, "weightsync_inference_running") == 0, "replicas free")
        # A client hanging up on the gateway mid-stream cancels the replica's generation.
        through = HeldStream(gateway, LONG)
        assert through.started.wait(60)
        through.release()
        wait_for(
            lambda: sum(metric(c, "weightsync_inference_cancelled_total") for c in replicas) == 3,
            "the relayed hang-up to cancel the generation",
        )
        for c in replicas:
            wait_for(lambda c=c: metric(c, "weightsync_inference_running") == 0, "replicas free")
