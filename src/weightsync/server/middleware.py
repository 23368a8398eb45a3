"""ASGI middleware shared by the replica and gateway apps: API key, deployment, body limit, metrics.

Pure ASGI (no BaseHTTPMiddleware) so request bodies stream and nothing is buffered twice.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from weightsync.server.config import ServedDeployment
from weightsync.server.metrics import HttpMetrics
from weightsync.wire import (
    ACCOUNTS_PATH,
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    DEPLOYMENT_HEADER,
    HEALTH_PATH,
    METRICS_PATH,
    MODEL_HEADER,
    error_body,
)

#: Routes that need no API key: liveness must work for any supervisor.
PUBLIC_PATHS = frozenset({HEALTH_PATH})
#: Routes that serve no deployment, so a deployment header does not apply to them.
UNROUTED_PATHS = frozenset({HEALTH_PATH, METRICS_PATH, ACCOUNTS_PATH})
_AUTHORIZATION = AUTHORIZATION_HEADER.encode()
_API_KEY = API_KEY_HEADER.encode()
_DEPLOYMENT = DEPLOYMENT_HEADER.encode()
_MODEL = MODEL_HEADER.encode()


async def _send_error(
    send: Send,
    status: int,
    message: str,
    kind: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(status, message, kind)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(HTTPException):
    """Raised from `receive` so FastAPI's body reader passes it through as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


def _presented_keys(headers: dict[bytes, bytes]) -> list[bytes]:
    """The API keys a request carries: `Authorization: Bearer <key>` and `X-Api-Key: <key>`."""
    keys = []
    auth = headers.get(_AUTHORIZATION)
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            keys.append(token.strip())
    api_key = headers.get(_API_KEY)
    if api_key is not None:
        keys.append(api_key.strip())
    return keys


class GuardMiddleware:
    """Checks the API key (when one is set) and caps request bodies.

    The key is accepted as `Authorization: Bearer <key>` (OpenAI clients) or
    `X-Api-Key: <key>` (the Fireworks SDK); one matching key suffices. Keys are
    compared in constant time.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        # Compare every presented key (no early exit), each in constant time.
        matches = [hmac.compare_digest(key, self.api_key) for key in _presented_keys(headers)]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope.get("path") not in PUBLIC_PATHS and not self._authorized(headers):
            await _send_error(
                send,
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>' or "
                "'X-Api-Key: <key>' with the key the deployment was started with",
                "AuthenticationError",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, 413, self._too_large(), "RequestTooLargeError")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, self._too_large(), "RequestTooLargeError")

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"


class DeploymentMiddleware:
    """404 for a request addressed to another deployment than the one served.

    Honours the Fireworks SDK's `fireworks-deployment` header and a
    `fireworks-model` header that names a deployment resource
    (`accounts/{a}/deployments/{d}`); a plain model name there is not checked
    (the SDK sends the base model's name).
    """

    def __init__(self, app: ASGIApp, *, served: ServedDeployment) -> None:
        self.app = app
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in UNROUTED_PATHS:
            headers = dict(scope.get("headers") or [])
            for header in (_DEPLOYMENT, _MODEL):
                value = headers.get(header)
                if value is None:
                    continue
                problem = self.served.mismatch(
                    value.decode("latin-1"), f"the {header.decode()} header"
                )
                if problem is not None:
                    await _send_error(send, 404, problem, "DeploymentNotFoundError")
                    return
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Counts requests and observes latency by route template (not raw path)."""

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route: Any = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(name, status, time.perf_counter() - started)
