"""`weightsync serve`'s logging: records go to the stderr of the moment, as text or JSON."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from weightsync.server.logs import configure_logging

pytestmark = pytest.mark.usefixtures("root_logger_restored")


def test_records_follow_sys_stderr_after_the_one_at_setup_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured while a host (a CLI test runner) had swapped stderr, which it then closed:
    later records go to the stderr of their moment, not to the closed stream."""
    during_setup = io.StringIO()
    monkeypatch.setattr(sys, "stderr", during_setup)
    configure_logging(level="info", fmt="json", replica_id="replica-0")
    during_setup.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("weightsync.test").info("after the swap")
    doc = json.loads(now.getvalue())
    assert doc["message"] == "after the swap" and doc["replica_id"] == "replica-0"
    assert doc["level"] == "INFO"
