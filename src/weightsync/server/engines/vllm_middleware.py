"""ASGI middleware for vLLM's own OpenAI server: every answer names the snapshot serving it.

Loaded into `vllm serve` with `--middleware
weightsync.server.engines.vllm_middleware.SnapshotIdentityMiddleware`. It keeps
one label, the identity of the snapshot the worker holds, which the weightsync
sidecar sets while vLLM is paused (after the in-place apply, before `/resume`)
through `POST /weightsync/snapshot` (guarded by the token in
`WEIGHTSYNC_VLLM_CONTROL_TOKEN`, which the sidecar puts in vLLM's environment).

On `/v1/completions` and `/v1/chat/completions` it adds:

- the header `x-weightsync-snapshot-identity` (the label when the answer starts);
- on every streamed chunk (`data: {...}` events) the field `snapshot_identity`,
  the label when vLLM's route hands that chunk over, so a stream that spans an
  async swap says where it changed;
- on a whole (non-streamed) answer `snapshot_identity` (the label when it ends)
  and `snapshot_identities` (the labels seen while it ran, in order: more than one
  means the answer spans a swap).

Why the label is right per chunk: the label changes only while vLLM is paused,
after `/pause` returned (vLLM hands out the outputs of steps taken before the
pause before it answers) and after the apply; every token produced after
`/resume` comes from the new weights, and every chunk handed over before the
label changed came from the old ones. For that the route must never wait on the
client: a stream's chunks are stamped when the route hands them over and sent
from a task of their own, so a client that reads slowly (TCP backpressure) holds
chunks in this queue, already stamped, instead of stalling the route — which
would leave vLLM's outputs of both snapshots to be merged into one chunk read
after the swap. The queue holds at most one answer's own chunks.

This module imports without vLLM (it is plain ASGI; it watches the sidecar with
`processes.watch_parent`, the rule every child of weightsync follows), so it is
linted and typed with the rest of weightsync.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from weightsync.server.processes import watch_parent

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_ENV = "WEIGHTSYNC_VLLM_CONTROL_TOKEN"
#: The sidecar's pid (vLLM's server is its child): vLLM's server stops itself when it is gone.
PARENT_ENV = "WEIGHTSYNC_VLLM_PARENT_PID"
CONTROL_PATH = "/weightsync/snapshot"
HEADER = b"x-weightsync-snapshot-identity"
LABELLED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class SnapshotIdentityMiddleware:
    """Labels vLLM's OpenAI answers with the served snapshot identity (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        _watch_sidecar(os.environ.get(PARENT_ENV, ""))
        self.identity = ""
        #: Every label set so far, in order (a whole answer lists those seen while it ran).
        self.history: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == CONTROL_PATH:
            await self._control(scope, receive, send)
        elif path in LABELLED_PATHS:
            await self._labelled(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # --- the sidecar's label route ------------------------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = os.environ.get(TOKEN_ENV, "")
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ")
        if not token or not hmac.compare_digest(given, token):
            await _json(send, 403, {"error": f"{CONTROL_PATH} needs the sidecar's token"})
            return
        if scope.get("method") == "GET":
            await _json(send, 200, {"snapshot_identity": self.identity})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            identity = json.loads(body)["snapshot_identity"]
        except (ValueError, KeyError, TypeError):
            identity = None
        if not isinstance(identity, str) or not identity:
            await _json(send, 400, {"error": 'send {"snapshot_identity": "<identity>"}'})
            return
        if identity != self.identity:
            self.identity = identity
            self.history.append(identity)
        await _json(send, 200, {"snapshot_identity": self.identity})

    # --- labelled inference answers -------------------------------------------------

    async def _labelled(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen_from = len(self.history)
        state: dict[str, Any] = {"stream": False, "json": False, "pending": b"", "whole": b""}
        writer: _StreamWriter | None = None

        async def labelling_send(message: Message) -> None:
            nonlocal writer
            kind = message["type"]
            if writer is not None:  # a stream: stamped now, sent by the writer's task
                if kind == "http.response.body":
                    more = bool(message.get("more_body"))
                    data = self._label_events(state, message.get("body", b""), final=not more)
                    writer.put({**message, "body": data})
                else:
                    writer.put(message)
                return
            if kind == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])]
                content_type = dict(headers).get(b"content-type", b"")
                state["stream"] = content_type.startswith(b"text/event-stream")
                state["json"] = content_type.startswith(b"application/json")
                if state["json"]:  # the body grows: its length is set when it is complete
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((HEADER, self.identity.encode()))
                state["start"] = {**message, "headers": headers}
                if state["stream"]:
                    writer = _StreamWriter(send)
                    writer.put(state["start"])
                elif not state["json"]:
                    await send(state["start"])
                return
            if kind != "http.response.body":
                await send(message)
                return
            more = bool(message.get("more_body"))
            body: bytes = message.get("body", b"")
            if state["json"]:
                state["whole"] += body
                if not more:
                    data = self._label_whole(state["whole"], seen_from)
                    start = state["start"]
                    start["headers"].append((b"content-length", str(len(data)).encode()))
                    await send(start)
                    await send({"type": "http.response.body", "body": data})
            else:
                await send(message)

        try:
            await self.app(scope, receive, labelling_send)
        except BaseException:
            if writer is not None:
                writer.cancel()
            raise
        if writer is not None:
            await writer.flush()

    def _label_events(self, state: dict[str, Any], body: bytes, *, final: bool) -> bytes:
        """Add `snapshot_identity` to each complete `data: {...}` event of the stream."""
        buffer: bytes = state["pending"] + body
        *events, rest = buffer.split(b"\n\n")
        if final:
            events, rest = [*events, rest] if rest else events, b""
        state["pending"] = rest
        out = []
        for event in events:
            if event.startswith(b"data: {"):
                try:
                    chunk = json.loads(event[len(b"data: ") :])
                except ValueError:
                    out.append(event)
                    continue
                if isinstance(chunk, dict):
                    chunk["snapshot_identity"] = self.identity
                    out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode())
                    continue
            out.append(event)
        return b"".join(e + b"\n\n" for e in out)

    def _label_whole(self, body: bytes, seen_from: int) -> bytes:
        try:
            answer = json.loads(body)
        except ValueError:
            return body
        if not isinstance(answer, dict) or "choices" not in answer:
            return body  # an error answer: left as vLLM wrote it
        # The label when the request came in, then every one set while it ran.
        before = self.history[seen_from - 1 : seen_from] if seen_from else []
        seen = [*before, *self.history[seen_from:]] or [self.identity]
        answer["snapshot_identity"] = self.identity
        answer["snapshot_identities"] = seen
        return json.dumps(answer, separators=(",", ":")).encode()


class _StreamWriter:
    """Sends one answer's messages in order from its own task; `put` never waits.

    The route's `send` returns at once, so it keeps taking vLLM's outputs as they
    come however slowly the client reads (module docstring). A failure of the real
    `send` (the client went away) is raised to the route at its next `put`, and by
    `flush`.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def put(self, message: Message) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put_nowait(message)

    async def flush(self) -> None:
        """Wait until every message put has been sent (or the real `send` failed)."""
        self._queue.put_nowait(None)
        await self._task
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while (message := await self._queue.get()) is not None:
            try:
                await self._send(message)
            except Exception as e:  # noqa: BLE001  (handed to the route, see the class doc)
                self._error = e
                return


_watching: list[int] = []


def _watch_sidecar(parent: str) -> None:
    """Stop this vLLM server (SIGTERM: its graceful shutdown) once the sidecar, its parent
    (`PARENT_ENV`), has died; one watcher per process, however often vLLM builds the app.

    Without it a sidecar killed hard would leave vLLM's server, engine core and
    workers running with nobody to drive or stop them.
    """
    if not parent.isdigit() or _watching:
        return
    _watching.append(int(parent))
    watch_parent(int(parent))


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
