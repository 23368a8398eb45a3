"""Logging setup for `weightsync serve`: plain text, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "replica_id"?, "exc"?}` per line."""

    def __init__(self, *, replica_id: str | None = None) -> None:
        super().__init__()
        self.replica_id = replica_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.replica_id:
            doc["replica_id"] = self.replica_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record to `sys.stderr` as it is when the record is emitted.

    A plain `StreamHandler()` keeps the stream it was made with: where `serve` runs
    inside a host that swaps `sys.stderr` for a while (a CLI test runner), later records
    went to that closed stream and each raised a logging error.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr


def configure_logging(
    *, level: str = "info", fmt: LogFormat = "text", replica_id: str | None = None
) -> None:
    """Log to stderr at `level`, as text or JSON lines, replacing the root's handlers."""
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(replica_id=replica_id))
    else:
        prefix = f"[{replica_id}] " if replica_id else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
