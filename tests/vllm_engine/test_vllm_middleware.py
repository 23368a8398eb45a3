"""The snapshot-label middleware as plain ASGI (no vLLM needed: it runs in every venv).

A small ASGI app stands in for vLLM's routes' *answers* only: the middleware's
contract is about the bytes it passes on (events split anywhere, whole JSON
answers, the guarded label route), which the real server is tested for in
test_vllm_deployment.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from weightsync.server.engines.vllm_middleware import (
    CONTROL_PATH,
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
