"""Background work that should take only the CPU time others leave idle."""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)


def lowest_priority(what: str) -> None:
    """Give the calling thread the lowest CPU priority (Linux: per thread); elsewhere
    leave it, since the call would lower the whole process. `what` names the work in
    the warning when the priority cannot be lowered (never fatal: the work then
    competes as an equal)."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError as e:
            logger.warning("could not lower the priority of %s: %s", what, e)


__all__ = ["lowest_priority"]
