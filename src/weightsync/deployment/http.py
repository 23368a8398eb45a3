"""The HTTP client of a deployment: httpx with retries for transient connection errors.

Only failures where the request most likely never reached the server (connect
errors, a connection dropped before any response, pool timeouts) are retried,
with exponential backoff; an HTTP error status is never retried here — it is the
server's answer and becomes a `DeploymentHTTPError` carrying method, URL, status
and the server's own message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from weightsync.errors import DeploymentError, DeploymentHTTPError, InvalidInputError

logger = logging.getLogger(__name__)

#: Errors where the request did not get an answer and is safe to send again.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
    httpx.ReadError,
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient connection errors are retried: `max_retries` more tries, backoff doubling."""

    max_retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise InvalidInputError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise InvalidInputError("backoff_s and max_backoff_s must be >= 0")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1))))


def auth_headers(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def server_message(response: httpx.Response) -> str:
    """The server's own explanation of an error response (FastAPI `detail`, or the body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            if key in body:
                value = body[key]
                if isinstance(value, dict) and "message" in value:
                    return str(value["message"])
                return str(value)
    return str(body)[:2000]


def raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    request = response.request
    raise DeploymentHTTPError(
        request.method, str(request.url), response.status_code, server_message(response)
    )


def _unreachable(method: str, url: str, attempts: int, error: Exception) -> DeploymentError:
    return DeploymentError(
        f"{method} {url} failed after {attempts} attempt(s): {type(error).__name__}: {error}. "
        "Is the deployment running and the URL right? Check it with "
        "`weightsync deploy status <url>` (or DeploymentManager.get(deployment_id))."
    )


class DeploymentHTTP:
    """A synchronous JSON client of one or more deployments (one shared connection pool)."""

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        verify_ssl: bool = True,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._client = httpx.Client(
            headers=headers or {}, verify=verify_ssl, timeout=timeout_s, transport=transport
        )

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
    ) -> httpx.Response:
        """Send one request; retry transient connection errors; raise on an error status."""
        retries = self.retry.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            try:
                kwargs: dict[str, Any] = {"json": json, "headers": headers}
                if timeout_s is not None:
                    kwargs["timeout"] = timeout_s
                response = self._client.request(method, url, **kwargs)
            except TRANSIENT_ERRORS as e:
                attempt += 1
                if attempt > retries:
                    raise _unreachable(method, url, attempt, e) from e
                delay = self.retry.delay_s(attempt)
                logger.debug(
                    "%s %s: %s; retry %d/%d in %.2fs", method, url, e, attempt, retries, delay
                )
                time.sleep(delay)
                continue
            except httpx.HTTPError as e:
                raise DeploymentError(f"{method} {url} failed: {type(e).__name__}: {e}") from e
            raise_for_status(response)
            return response

    def get_json(self, url: str, **kwargs: Any) -> Any:
        return self.request("GET", url, **kwargs).json()

    def post_json(self, url: str, body: Any = None, **kwargs: Any) -> Any:
        response = self.request("POST", url, json=body, **kwargs)
        return response.json() if response.content else {}

    def close(self) -> None:
        self._client.close()


class AsyncDeploymentHTTP:
    """The asynchronous twin of `DeploymentHTTP` (used by `DeploymentSampler`)."""

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        verify_ssl: bool = True,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._client = httpx.AsyncClient(
            headers=headers or {}, verify=verify_ssl, timeout=timeout_s, transport=transport
        )

    async def post_json(self, url: str, body: Any) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._client.post(url, json=body)
            except TRANSIENT_ERRORS as e:
                attempt += 1
                if attempt > self.retry.max_retries:
                    raise _unreachable("POST", url, attempt, e) from e
                await asyncio.sleep(self.retry.delay_s(attempt))
                continue
            except httpx.HTTPError as e:
                raise DeploymentError(f"POST {url} failed: {type(e).__name__}: {e}") from e
            raise_for_status(response)
            return response.json()

    async def aclose(self) -> None:
        await self._client.aclose()
