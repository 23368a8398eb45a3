"""Configuration of one replica and of a deployment (keyword-only, self-validating)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weightsync.errors import InvalidInputError
from weightsync.identity import validate_identity
from weightsync.server.fetch_policy import FetchPolicy

Transition = Literal["async", "sync"]
TRANSITIONS: tuple[Transition, ...] = ("async", "sync")

#: Default cap on a request body: hot-load and completion requests are small JSON.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MODEL_NAME = "weightsync"


def default_state_root() -> Path:
    """Where replicas keep their ledgers when no `--state-dir` is given."""
    return Path(tempfile.gettempdir()) / "weightsync-state"


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    """Everything one replica process needs besides its engine.

    Exactly one start source is given: `snapshot` (an identity under `storage`) or
    `model_dir` (a Hugging Face model directory). A ledger in `state_dir` that
    names a verified snapshot takes precedence on restart (recovery).
    """

    storage: str | None = None
    snapshot: str | None = None
    model_dir: Path | None = None
    snapshot_name: str | None = None
    state_dir: Path = field(default_factory=lambda: default_state_root() / "default")
    replica_id: str = "replica-0"
    model_name: str = DEFAULT_MODEL_NAME
    transition: Transition = "async"
    engine: str = "torch"
    #: Keyword options for the engine's constructor (e.g. {"num_threads": 1} for torch).
    engine_options: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Retries of transient storage errors and the time limit of a load's fetch stage.
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self) -> None:
        if (self.snapshot is None) == (self.model_dir is None):
            raise InvalidInputError(
                "give exactly one start source: a snapshot identity (with a storage URL) "
                "or a Hugging Face model directory"
            )
        if self.snapshot is not None:
            validate_identity(self.snapshot)
            if self.storage is None:
                raise InvalidInputError(
                    f"snapshot {self.snapshot!r} needs a storage URL (--storage) to load it from"
                )
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise InvalidInputError(f"model directory {self.model_dir} does not exist")
        if self.snapshot_name is not None:
            validate_identity(self.snapshot_name, what="snapshot name")
        if self.transition not in TRANSITIONS:
            raise InvalidInputError(
                f"unknown transition {self.transition!r}; choose one of {', '.join(TRANSITIONS)}"
            )
        if self.max_body_bytes < 1024:
            raise InvalidInputError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.model_name or "@" in self.model_name:
            raise InvalidInputError(
                f"model name {self.model_name!r} must be non-empty and must not contain '@'"
            )

    @property
    def start_identity(self) -> str:
        """The identity the start source is reported under."""
        if self.snapshot is not None:
            return self.snapshot
        if self.snapshot_name is not None:
            return self.snapshot_name
        return validate_identity(Path(self.model_dir or ".").resolve().name, what="model dir name")
