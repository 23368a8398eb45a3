"""The JSON body of every error answer (the OpenAI shape, so `openai` and the SDK show it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from weightsync.wire.base import WireModel


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    #: What failed, which snapshot/path/URL, and what to do.
    message: str
    #: The error's class (`HotloadRefusedError`, `InvalidRequestError`, ...).
    type: str
    #: The HTTP status code, repeated.
    code: int


class ErrorBody(WireModel):
    """`{"error": {...}}`; a gateway adds every replica's entry under `replicas`."""

    omit_if_none = frozenset({"replicas"})

    error: ErrorDetail
    replicas: list[dict[str, Any]] | None = None


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """The error body as JSON-ready data."""
    return {"error": {"message": message, "type": kind, "code": status}}
