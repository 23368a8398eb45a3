"""Wire models (pydantic) of the hot-load API; the OpenAI models live in `openai_api`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from weightsync.errors import InvalidInputError

#: What the engine is asked to drop after a swap.
CacheResetPolicy = Literal["all", "none", "new_session"]
_RESET_ALIASES: dict[object, CacheResetPolicy] = {
    True: "all",
    False: "none",
    "all": "all",
    "none": "none",
    "new_session": "new_session",
}


def cache_reset_policy(value: bool | str | None) -> CacheResetPolicy:
    """Normalise `reset_prompt_cache` (true/false/"all"/"none"/"new_session"; default all)."""
    if value is None:
        return "all"
    policy = _RESET_ALIASES.get(value) if isinstance(value, bool | str) else None
    if policy is None:
        raise InvalidInputError(
            f"reset_prompt_cache {value!r} is not valid; use true, false, "
            '"all", "none" or "new_session"'
        )
    return policy


class IncrementalSnapshotMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    previous_snapshot_identity: str
    compression_format: str | None = None
    checksum_format: str | None = None


class HotLoadRequest(BaseModel):
    """`POST /hot_load/v1/models/hot_load` (DESIGN.md's hot-load API)."""

    model_config = ConfigDict(extra="allow")

    identity: str
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None
    reset_prompt_cache: bool | str | None = None


class HintRequest(BaseModel):
    """`POST /hot_load/v1/models/hot_load/hint`: start fetching before the hot-load.

    `files` names payload files already complete in storage (e.g. each shard as
    the trainer finishes it); without it, every file of the manifest is fetched.
    """

    model_config = ConfigDict(extra="allow")

    identity: str
    files: list[str] | None = Field(default=None, max_length=100_000)
