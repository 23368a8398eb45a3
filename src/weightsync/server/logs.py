"""Logging setup for `weightsync serve`: plain text, or one JSON object per line."""

from __future__ import annotations

import json
import logging
from typing import Literal

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


def configure_logging(
    *, level: str = "info", fmt: LogFormat = "text", replica_id: str | None = None
) -> None:
    handler = logging.StreamHandler()
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
