"""Observers of a replica's hot-load stages, and the one fault hook the CLI can install.

`Replica(on_stage=...)` calls the hook from the loader thread as each stage of a
hot-load begins: `("fetching" | "decoding" | "verifying" | "swapping" |
"checking", identity)`. Tests use it to hold a load at a stage. `checking` is
reported after the swap lock is released (the new weights are live, the ledger
does not name them yet), so a hook never extends the serving pause.

`WEIGHTSYNC_FAULT_STALL=<stage>:<seconds>` (read by `weightsync serve` and the
replica processes it starts, nowhere else) makes every hot-load of that process
sleep when it reaches `<stage>`. It exists for the fault-matrix tests, which
kill a replica process *during* decode or swap: those stages run in-process on
bytes already fetched, so no storage seam outside the process can hold them. A
stall only delays a load; it never changes what is loaded, verified or recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from weightsync.errors import InvalidInputError

logger = logging.getLogger(__name__)

StageHook = Callable[[str, str], None]
HOOK_STAGES = ("fetching", "decoding", "verifying", "swapping", "checking")
STALL_ENV = "WEIGHTSYNC_FAULT_STALL"


def stall_hook(stage: str, seconds: float) -> StageHook:
    """A hook that sleeps `seconds` whenever a hot-load reaches `stage`."""
    if stage not in HOOK_STAGES:
        raise InvalidInputError(
            f"cannot stall at stage {stage!r}; choose one of {', '.join(HOOK_STAGES)}"
        )
    if seconds < 0:
        raise InvalidInputError(f"stall seconds must be >= 0, got {seconds}")

    def hook(reached: str, identity: str) -> None:
        if reached == stage:
            logger.warning(
                "fault injection (%s): hot-load of %s stalls %.1fs at %s",
                STALL_ENV,
                identity,
                seconds,
                stage,
            )
            time.sleep(seconds)

    return hook


def stall_hook_from_env(environ: Mapping[str, str]) -> StageHook | None:
    """The hook `WEIGHTSYNC_FAULT_STALL=<stage>:<seconds>` asks for, or None when unset."""
    value = environ.get(STALL_ENV, "").strip()
    if not value:
        return None
    stage, _, seconds = value.partition(":")
    try:
        duration = float(seconds)
    except ValueError as e:
        raise InvalidInputError(
            f"{STALL_ENV}={value!r} must be '<stage>:<seconds>', e.g. 'decoding:30'"
        ) from e
    return stall_hook(stage, duration)


__all__ = ["HOOK_STAGES", "STALL_ENV", "StageHook", "stall_hook", "stall_hook_from_env"]
