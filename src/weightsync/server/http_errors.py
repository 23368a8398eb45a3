"""HTTP status codes by error category, and the JSON error body every route returns.

Body: `{"error": {"message": ..., "type": <error class>, "code": <status>}}` (the
OpenAI shape, so the `openai` client surfaces the message).

A message sent over HTTP never shows the server's own paths: each private path
(the storage root, the state and model directories) becomes a label such as
`<storage>`, so a client reads `<storage>/step-1-0badcafe/weightsync.json`, the
path relative to the storage root; the full message goes to the server log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from weightsync.errors import (
    ChainError,
    DeploymentConflictError,
    DeploymentError,
    DeploymentNotFoundError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidInputError,
    OverloadedError,
    SnapshotCorruptError,
    SnapshotNotFoundError,
    StorageError,
    StorageFileNotFoundError,
    SwapInProgressError,
    UnsupportedOperationError,
    WeightSyncError,
)

logger = logging.getLogger(__name__)

# First match wins: subclasses before their parents.
_STATUS: tuple[tuple[type[WeightSyncError], int], ...] = (
    (SwapInProgressError, 425),
    (OverloadedError, 429),
    (HotloadRefusedError, 409),
    (ChainError, 409),
    (SnapshotNotFoundError, 404),
    (DeploymentNotFoundError, 404),
    (DeploymentConflictError, 409),
    (StorageFileNotFoundError, 404),
    (InvalidInputError, 400),
    (SnapshotCorruptError, 400),
    (UnsupportedOperationError, 400),
    (HotloadTimeoutError, 504),
    (StorageError, 502),
    (DeploymentError, 503),
)


def status_for(error: WeightSyncError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


PrivatePaths = Mapping[str | os.PathLike[str] | None, str]


def redact_paths(text: str, private_paths: PrivatePaths) -> str:
    """`text` with each private path (and its symlink-resolved form) replaced by its label."""
    labels: dict[str, str] = {}
    for path, label in private_paths.items():
        if path is None:
            continue
        raw = os.fspath(path).rstrip("/")
        if not raw:
            continue
        labels[raw] = label
        if "://" not in raw:
            labels[Path(raw).absolute().as_posix()] = label
            labels[Path(raw).resolve().as_posix()] = label
    # Longest first: a state dir inside the storage root keeps its own label.
    for raw in sorted(labels, key=len, reverse=True):
        text = text.replace(raw, labels[raw])
    return text


def redact_error_fields(doc: Any, private_paths: PrivatePaths) -> Any:
    """A copy of a JSON-like `doc` whose `"error"` strings (at any depth) are redacted:
    a status reports a failed load's error as it was raised, server paths included."""
    if isinstance(doc, dict):
        return {
            key: redact_paths(value, private_paths)
            if key == "error" and isinstance(value, str)
            else redact_error_fields(value, private_paths)
            for key, value in doc.items()
        }
    if isinstance(doc, list):
        return [redact_error_fields(item, private_paths) for item in doc]
    return doc


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}
    )


def install_error_handlers(app: FastAPI, *, private_paths: PrivatePaths | None = None) -> None:
    """Map errors to statuses and bodies; `private_paths` (path -> label) are redacted."""
    hidden: PrivatePaths = private_paths or {}

    @app.exception_handler(WeightSyncError)
    async def _weightsync(request: Request, exc: WeightSyncError) -> JSONResponse:
        status = status_for(exc)
        message = redact_paths(str(exc), hidden)
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        elif message != str(exc):  # the full paths stay in the server's log
            logger.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        response = error_response(status, message, type(exc).__name__)
        if isinstance(exc, OverloadedError):
            response.headers["retry-after"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(
            400, f"invalid request: {'; '.join(problems[:10])}", "InvalidRequestError"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "HTTPError")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed with an unexpected error", request.method, request.url.path)
        message = redact_paths(f"internal error: {exc!r}", hidden)
        return error_response(500, message, type(exc).__name__)
