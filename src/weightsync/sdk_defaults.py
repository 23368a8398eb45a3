"""The Fireworks training SDK's defaults that weightsync's Python API keeps (fireworks-ai 1.2.30).

Light on purpose (it imports only the error tree): the trainer and the syncer
both read it, and importing `weightsync` must not load torch.
"""

from __future__ import annotations

from typing import Literal

from weightsync.errors import InvalidInputError

#: Delta codec of `TrainingClient` and `WeightSyncer` unless told otherwise: the
#: SDK's `DEFAULT_DELTA_COMPRESSION`. `"wsdelta1"` writes fewer bytes (docs/codecs.md).
DEFAULT_COMPRESSION_FORMAT = "arc_v2"
#: The SDK's `HOTLOAD_WAIT_TIMEOUT_S`: how long `hotload_and_wait` waits by default.
HOTLOAD_WAIT_TIMEOUT_S = 400

CheckpointType = Literal["base", "delta", "merged_base"]
#: `checkpoint_type` values a sampler save accepts, in any case (the SDK lower-cases them).
CHECKPOINT_TYPES: tuple[CheckpointType, ...] = ("base", "delta", "merged_base")


def normalize_checkpoint_type(
    value: str | None, *, what: str = "checkpoint_type", where: str = ""
) -> CheckpointType | None:
    """`value` lower-cased and checked (`"BASE"` -> `"base"`); None stays None (automatic)."""
    if value is None:
        return None
    normalized = value.lower() if isinstance(value, str) else value
    if normalized not in CHECKPOINT_TYPES:
        raise InvalidInputError(
            f"unknown {what} {value!r}{where}; choose None (base first, then deltas) or one "
            f"of {', '.join(CHECKPOINT_TYPES)} (in any case)"
        )
    return normalized
