"""The snapshot-label middleware as plain ASGI (no vLLM needed: it runs in every venv).

A small ASGI app stands in for vLLM's routes' *answers* only: the middleware's
contract is about the bytes it passes on (events split anywhere, whole JSON
answers, the guarded label route), which the real server is tested for in
test_vllm_deployment.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from weightsync.server.engines.vllm_middleware import (
    CONTROL_PATH,
    PARENT_ENV,
    TOKEN_ENV,
    SnapshotIdentityMiddleware,
)


def answering(content_type: bytes, parts: list[bytes]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", content_type)]
        if content_type.startswith(b"application/json"):
            headers.append((b"content-length", str(sum(map(len, parts))).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, part in enumerate(parts):
            await send(
                {"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1}
            )

    return app


def call(
    mw: SnapshotIdentityMiddleware,
    path: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": headers or []}
    asyncio.run(mw(scope, receive, send))
    start = sent[0]
    data = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), data


def label(mw: SnapshotIdentityMiddleware, identity: str, token: str = "t0k") -> int:
    status, _, _ = call(
        mw,
        CONTROL_PATH,
        body=json.dumps({"snapshot_identity": identity}).encode(),
        headers=[(b"authorization", f"Bearer {token}".encode())],
    )
    return status


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "t0k")


def test_streamed_events_split_anywhere_each_get_the_label() -> None:
    events = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\n'
    events += b"data: [DONE]\n\n"
    # Cut inside the first event, inside the separator and inside the last one.
    parts = [events[:10], events[10:33], events[33:60], events[60:]]
    mw = SnapshotIdentityMiddleware(answering(b"text/event-stream", parts))
    assert label(mw, "snap-1") == 200
    status, headers, data = call(mw, "/v1/completions")
    assert status == 200 and headers[b"x-weightsync-snapshot-identity"] == b"snap-1"
    chunks = [e for e in data.split(b"\n\n") if e]
    assert chunks[-1] == b"data: [DONE]"
    parsed = [json.loads(c[len(b"data: ") :]) for c in chunks[:-1]]
    assert [c["choices"][0]["text"] for c in parsed] == ["a", "b"]
    assert all(c["snapshot_identity"] == "snap-1" for c in parsed)


def test_whole_answer_names_the_snapshot_and_its_length_is_right() -> None:
    body = json.dumps({"choices": [{"text": "hello"}]}).encode()
    mw = SnapshotIdentityMiddleware(answering(b"application/json", [body[:7], body[7:]]))
    label(mw, "snap-1")
    label(mw, "snap-2")
    _, headers, data = call(mw, "/v1/chat/completions")
    answer = json.loads(data)
    assert int(headers[b"content-length"]) == len(data)
    assert answer["snapshot_identity"] == "snap-2"
    assert answer["snapshot_identities"] == ["snap-2"]
    assert answer["choices"] == [{"text": "hello"}]


def test_error_answers_and_other_routes_pass_unchanged() -> None:
    error = json.dumps({"error": {"message": "bad"}}).encode()
    mw = SnapshotIdentityMiddleware(answering(b"application/json", [error]))
    label(mw, "snap-1")
    _, _, data = call(mw, "/v1/completions")
    assert data == error
    _, headers, data = call(mw, "/v1/models", method="GET")
    assert data == error and b"x-weightsync-snapshot-identity" not in headers


def test_label_route_needs_the_token_and_an_identity() -> None:
    mw = SnapshotIdentityMiddleware(answering(b"application/json", [b"{}"]))
    assert label(mw, "snap-1", token="wrong") == 403
    status, _, data = call(mw, CONTROL_PATH, method="GET")
    assert status == 403
    assert label(mw, "") == 400
    assert label(mw, "snap-1") == 200
    status, _, data = call(
        mw, CONTROL_PATH, method="GET", headers=[(b"authorization", b"Bearer t0k")]
    )
    assert status == 200 and json.loads(data) == {"snapshot_identity": "snap-1"}


def test_a_slow_client_never_stalls_the_stream_so_each_chunk_keeps_its_label() -> None:
    """A chunk is stamped when the route hands it over, even while the client reads nothing.

    The client's socket is full (the real `send` blocks until it reads): the route
    must still get its `send` back at once, or vLLM's tokens of both snapshots would
    wait in the route and leave, merged, under the label set after the swap.
    """
    mw = SnapshotIdentityMiddleware(answering(b"text/event-stream", []))
    assert label(mw, "snap-1") == 200
    handed_over = asyncio.Event()
    relabelled = asyncio.Event()
    reading = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def route(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'data: {"n":1}\n\n', "more_body": True})
        handed_over.set()
        await relabelled.wait()
        await send({"type": "http.response.body", "body": b'data: {"n":2}\n\n', "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def client_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await reading.wait()  # backpressure: nothing leaves until the client reads
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario() -> None:
        mw.app = route
        scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}
        answer = asyncio.create_task(mw(scope, receive, client_send))
        await asyncio.wait_for(handed_over.wait(), timeout=5)  # not stuck behind the client
        mw.identity = "snap-2"  # what the label route sets, mid-stream
        relabelled.set()
        await asyncio.sleep(0)
        reading.set()
        await asyncio.wait_for(answer, timeout=5)

    asyncio.run(scenario())
    data = b"".join(m.get("body", b"") for m in sent[1:])
    chunks = [
        json.loads(e[len(b"data: ") :]) for e in data.split(b"\n\n") if e.startswith(b"data: {")
    ]
    assert [(c["n"], c["snapshot_identity"]) for c in chunks] == [(1, "snap-1"), (2, "snap-2")]
    assert data.endswith(b"data: [DONE]\n\n")


def test_a_failed_send_of_a_stream_reaches_the_route() -> None:
    """The client went away: the route's next `send` raises, so it stops generating."""
    failures: list[BaseException] = []

    async def route(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        try:
            for _ in range(100):
                await send(
                    {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
                )
                await asyncio.sleep(0.01)
        except OSError as e:
            failures.append(e)
            raise

    async def broken_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("connection reset by peer")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    mw = SnapshotIdentityMiddleware(route)
    scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}
    with pytest.raises(OSError, match="connection reset"):
        asyncio.run(asyncio.wait_for(mw(scope, receive, broken_send), timeout=5))
    assert len(failures) == 1


# The vLLM server stand-in: builds the middleware with the sidecar's pid in its environment,
# says so, and records the SIGTERM it gets (vLLM's server shuts down gracefully on it).
_SERVER = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.joinpath("sigterm").touch(), sys.exit(0)))
from weightsync.server.engines.vllm_middleware import SnapshotIdentityMiddleware
async def app(scope, receive, send): pass
SnapshotIdentityMiddleware(app)
out.joinpath("watching").touch()
time.sleep(300)
"""
# The sidecar stand-in: starts the server as its child, as the sidecar starts vLLM's.
_SIDECAR = """
import os, subprocess, sys, time
server = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], sys.argv[2]],
    env={**os.environ, sys.argv[3]: str(os.getpid())},
)
open(os.path.join(sys.argv[2], "server.pid"), "w").write(str(server.pid))
time.sleep(300)
"""


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout_s}s")
        time.sleep(0.1)


def test_the_server_stops_itself_once_the_sidecar_is_killed(tmp_path: Path) -> None:
    sidecar = subprocess.Popen([sys.executable, "-c", _SIDECAR, _SERVER, str(tmp_path), PARENT_ENV])
    server_pid = None
    try:
        _wait_for(tmp_path / "watching", 120.0)  # imports weightsync (torch) on a busy machine
        server_pid = int((tmp_path / "server.pid").read_text())
        assert not (tmp_path / "sigterm").exists()  # alive while the sidecar is
        sidecar.kill()  # killed hard: no chance to stop its child itself
        sidecar.wait(30)
        _wait_for(tmp_path / "sigterm", 30.0)
    finally:
        sidecar.kill()
        sidecar.wait(30)
        if server_pid is not None and psutil.pid_exists(server_pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(server_pid).kill()
