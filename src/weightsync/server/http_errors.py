"""HTTP status codes by error category, and the JSON error body every route returns.

Body: `{"error": {"message": ..., "type": <error class>, "code": <status>}}` (the
OpenAI shape, so the `openai` client surfaces the message).
"""

from __future__ import annotations

import logging

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


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": status}}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(WeightSyncError)
    async def _weightsync(request: Request, exc: WeightSyncError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(status, str(exc), type(exc).__name__)

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
        return error_response(500, f"internal error: {exc!r}", type(exc).__name__)
