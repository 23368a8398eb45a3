"""The hot-load API's wire contract: enumerations, requests and answers (DESIGN.md).

Requests are parsed tolerantly (unknown fields allowed: the Fireworks SDK and
newer clients may send more). Answers allow unknown fields too, so a client
reading a newer server keeps working; the server sends only declared fields
(pinned by `tests/server/test_wire_contract.py`). Optional fields that a
replica sends only when set (`error`, `progress`, `url`) are left out of the
JSON when `None`.

A replica answers with its own entry; the gateway answers the same routes
with one entry per replica under `"replicas"` (`*Answers` models). Status,
hint, weights and ledger answers are lists on both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from weightsync.errors import InvalidInputError
from weightsync.wire.base import WireModel

# --- enumerations -------------------------------------------------------------

#: The hot-load state machine's stages (the drawing is in the replica's load pipeline).
Stage = Literal[
    "idle", "fetching", "decoding", "verifying", "swapping", "checking", "ready", "error"
]
#: Stages during which a load is running (one load runs at a time per replica).
LOADING_STAGES: tuple[Stage, ...] = ("fetching", "decoding", "verifying", "swapping", "checking")

#: The status GET's long-poll: `?wait_s=S` answers as soon as no load runs (every replica,
#: at a gateway) or after S seconds, whichever comes first; without it the answer is at once.
HOT_LOAD_WAIT_PARAM = "wait_s"
#: The longest wait a status GET may ask for (a longer one is refused: 400).
MAX_HOT_LOAD_WAIT_S = 30.0

#: How in-flight requests meet a swap: `async` at a token boundary, `sync` after they finish.
Transition = Literal["async", "sync"]
TRANSITIONS: tuple[Transition, ...] = ("async", "sync")

#: What the engine is asked to drop after a swap.
CacheResetPolicy = Literal["all", "none", "new_session"]
_RESET_ALIASES: dict[object, CacheResetPolicy] = {
    True: "all",
    False: "none",
    "all": "all",
    "none": "none",
    "new_session": "new_session",
}

#: What a snapshot (and so a load) is.
LoadKind = Literal["base", "delta", "lora"]
LoadResult = Literal["ok", "error"]
#: Where a load's weights were read from: a snapshot storage, or a Hugging Face model directory.
SourceKind = Literal["storage", "model_dir"]
#: A replica's answer to a hot-load POST it did not refuse.
HotLoadDisposition = Literal["accepted", "loading", "already_serving"]
#: Where a replica stands in an elastic deployment (a gateway over Ray actors): `admitted`
#: replicas take inference and hot-loads; `catching_up` ones are loading the chain up to the
#: head; `missing` ones are not running (their node is gone, or Ray is restarting them).
MemberState = Literal["admitted", "catching_up", "missing"]


def cache_reset_policy(value: object) -> CacheResetPolicy:
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


# --- POST /hot_load/v1/models/hot_load ---------------------------------------------


class IncrementalSnapshotMetadata(BaseModel):
    """What a delta's hot-load names besides its identity (the SDK's field names)."""

    model_config = ConfigDict(extra="allow")

    previous_snapshot_identity: str
    compression_format: str | None = None
    checksum_format: str | None = None


class HotLoadRequest(BaseModel):
    """`POST /hot_load/v1/models/hot_load`: load `identity` (a delta names its parent)."""

    model_config = ConfigDict(extra="allow")

    identity: str
    incremental_snapshot_metadata: IncrementalSnapshotMetadata | None = None
    #: Sent as a bool (the SDK) or a policy name; parsed into a policy here, once.
    reset_prompt_cache: CacheResetPolicy = "all"

    @field_validator("reset_prompt_cache", mode="before")
    @classmethod
    def _normalise_reset(cls, value: object) -> CacheResetPolicy:
        return cache_reset_policy(value)


class HotLoadAnswer(WireModel):
    """One replica's acceptance of a hot-load (a refusal is an error body instead)."""

    status: HotLoadDisposition
    replica_id: str
    identity: str


class ReplicaFailure(WireModel):
    """A replica's entry in a gateway answer when that replica refused or was unreachable."""

    replica_id: str
    status_code: int
    error: str | None


class DeploymentMembership(WireModel):
    """Who an elastic deployment counted at one moment: its head and each replica's standing.

    "Every replica accepted" in a hot-load answer means every replica in `admitted`.
    """

    head_snapshot_identity: str | None
    admitted: list[str]
    catching_up: list[str]
    missing: list[str]


class HotLoadAnswers(WireModel):
    """The gateway's answer to a hot-load POST: every replica accepted.

    An elastic deployment adds `membership`: which replicas "every" counted.
    """

    omit_if_none = frozenset({"membership"})

    replicas: list[HotLoadAnswer]
    membership: DeploymentMembership | None = None


# --- POST /hot_load/v1/deployment/scale ---------------------------------------------


class ScaleRequest(BaseModel):
    """Run `replicas` replicas: new ones join at the head; removed ones are drained first."""

    model_config = ConfigDict(extra="allow")

    replicas: int = Field(ge=0, le=10_000)


class ScaleAnswer(WireModel):
    """The scale took: `replicas` now run (the added ones catching up until `membership`
    lists them admitted); `cancelled`, per removed replica, the requests its drain cut
    (None: it was missing or did not answer)."""

    replicas: int
    cancelled: dict[str, int | None]
    membership: DeploymentMembership


# --- GET /hot_load/v1/models/hot_load ----------------------------------------------


class LoadProgress(WireModel):
    """How far the running stage is: bytes to fetch, or tensors done of total."""

    omit_if_none = frozenset({"total_bytes", "done", "total"})

    total_bytes: int | None = None
    done: int | None = None
    total: int | None = None


class LoadedAdapter(WireModel):
    """A LoRA adapter served beside the base; the SDK's hot-load wait looks for
    `{"identity": <snapshot>, "status": "loaded"}` entries."""

    identity: str
    status: Literal["loaded"] = "loaded"


class LoadingState(WireModel):
    """The current (or last) load: its stage and target; `error` after a failed one."""

    omit_if_none = frozenset({"error", "progress"})

    stage: Stage
    target_snapshot_identity: str | None
    error: str | None = None
    progress: LoadProgress | None = None


class LoadRecord(WireModel):
    """One load attempt: what, from where, result, per-stage seconds, pause and bytes."""

    identity: str
    kind: LoadKind
    result: LoadResult
    parent: str | None = None
    source: str | None = None
    source_kind: SourceKind | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    fetch_s: float = 0.0
    decode_s: float = 0.0
    verify_s: float = 0.0
    stage_s: float = 0.0
    drain_s: float = 0.0
    pause_s: float = 0.0
    check_s: float = 0.0
    total_s: float = 0.0
    bytes_fetched: int = 0
    cache_entries_dropped: int = 0
    reset_prompt_cache: str | None = None
    weights_fingerprint: str | None = None
    cannot_prove: list[str] = Field(default_factory=list)


class ReplicaStatus(WireModel):
    """One replica's entry in the hot-load status (the SDK reads the first four fields).

    `readiness` is true only while the replica serves, verified, the identity it
    reports. `transition` and `engine` are None only in the gateway's entry for
    a replica it cannot reach; `url` is set by the gateway, and `membership` by the
    gateway of an elastic deployment (only `admitted` replicas count as "every replica").
    `inference_url` is where an engine that serves outside the replica answers
    inference (the `vllm` engine: vLLM's own OpenAI server); null otherwise.
    """

    omit_if_none = frozenset({"url", "membership"})

    replica_id: str
    current_snapshot_identity: str | None
    readiness: bool
    loading_state: LoadingState
    loaded_adapters: list[LoadedAdapter] = Field(default_factory=list)
    last_load: LoadRecord | None = None
    recovered_from_ledger: bool = False
    requires_base: bool = False
    transition: Transition | None = None
    engine: str | None = None
    degraded: str | None = None
    url: str | None = None
    membership: MemberState | None = None
    inference_url: str | None = None

    def adapter_identities(self) -> list[str]:
        """The identities of `loaded_adapters`, least recently used first."""
        return [adapter.identity for adapter in self.loaded_adapters]


class HotLoadStatus(WireModel):
    """`GET /hot_load/v1/models/hot_load`: `{"replicas": [...]}` (the SDK's strict schema)."""

    replicas: list[ReplicaStatus]


# --- POST /hot_load/v1/models/hot_load/hint ----------------------------------------


class HintRequest(BaseModel):
    """`POST /hot_load/v1/models/hot_load/hint`: start fetching before the hot-load.

    `files` names payload files already complete in storage (e.g. each shard as
    the trainer finishes it); without it, every file of the manifest is fetched.
    """

    model_config = ConfigDict(extra="allow")

    identity: str
    files: list[str] | None = Field(default=None, max_length=100_000)


class HintAnswer(WireModel):
    """The files a replica started reading ahead (those it already had are left out)."""

    replica_id: str
    identity: str
    queued_files: list[str]


class HintAnswers(WireModel):
    replicas: list[HintAnswer]


# --- GET /hot_load/v1/weights ------------------------------------------------------


class WeightsChecksums(WireModel):
    """Checksums of the weights a replica computes with, taken under one identity."""

    replica_id: str
    current_snapshot_identity: str | None
    checksum_format: str
    checksums: dict[str, str]


class WeightsAnswers(WireModel):
    replicas: list[WeightsChecksums]


# --- GET /hot_load/v1/ledger, POST /hot_load/v1/ledger/reset --------------------------


class LedgerEntry(LoadRecord):
    """One row of a replica's ledger: a load attempt, numbered in order (`seq`).

    `recovered` marks the load a restarted replica made from its own ledger.
    """

    seq: int | None = None
    recovered: bool = False


class ReplicaLedger(WireModel):
    replica_id: str
    entries: list[LedgerEntry]


class LedgerAnswers(WireModel):
    replicas: list[ReplicaLedger]


class LedgerReset(WireModel):
    """After a reset the next load must be a base (`requires_base`)."""

    replica_id: str
    removed_entries: int
    requires_base: bool


class LedgerResetAnswers(WireModel):
    replicas: list[LedgerReset]
