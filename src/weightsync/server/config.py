"""Configuration of one replica and of a deployment (keyword-only, self-validating)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from weightsync.errors import InvalidInputError
from weightsync.identity import validate_identity
from weightsync.server.fetch_policy import FetchPolicy
from weightsync.server.inference_admission import InferenceLimits
from weightsync.wire import TRANSITIONS, Transition, deployment_name, parse_deployment_name

#: Default cap on a request body: hot-load and completion requests are small JSON.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MODEL_NAME = "weightsync"
#: LoRA adapters a replica keeps loaded; loading one more unloads the least recently used.
DEFAULT_MAX_ADAPTERS = 8
#: The account `GET /v1/accounts` reports unless `--account-id` names another.
DEFAULT_ACCOUNT_ID = "weightsync"


def default_state_root() -> Path:
    """Where replicas keep their ledgers when no `--state-dir` is given."""
    return Path(tempfile.gettempdir()) / "weightsync-state"


def default_deployment_id(model_name: str) -> str:
    """The deployment id a server reports when none is given: its model name's last segment."""
    return model_name.rstrip("/").rsplit("/", 1)[-1] or DEFAULT_MODEL_NAME


@dataclass(frozen=True, kw_only=True)
class ServedDeployment:
    """Which Fireworks account and deployment a server answers for (the control plane).

    Requests naming another deployment (`fireworks-deployment`, a `fireworks-model`
    of the form `accounts/{a}/deployments/{d}`, or the resource path) get a 404
    that names this one.
    """

    account_id: str = DEFAULT_ACCOUNT_ID
    deployment_id: str = DEFAULT_MODEL_NAME
    model_name: str = DEFAULT_MODEL_NAME
    #: The snapshot storage the deployment loads from (reported as `hotLoadBucketUrl`).
    storage: str | None = None

    def __post_init__(self) -> None:
        validate_identity(self.account_id, what="account id")
        validate_identity(self.deployment_id, what="deployment id")

    @property
    def name(self) -> str:
        """`accounts/{account_id}/deployments/{deployment_id}`."""
        return deployment_name(self.account_id, self.deployment_id)

    def mismatch(self, name: str, where: str) -> str | None:
        """Why `name` (from `where`) is not this deployment, or None if it is (or is no name)."""
        parsed = parse_deployment_name(name.strip())
        if parsed is None or parsed == (self.account_id, self.deployment_id):
            return None
        return self.not_served(parsed[0], parsed[1], where)

    def not_served(self, account_id: str, deployment_id: str, where: str) -> str:
        """The message of the 404 for a request addressed to another deployment."""
        return (
            f"{where} names deployment {deployment_name(account_id, deployment_id)!r}, but this "
            f"server serves {self.name!r} (model {self.model_name!r}); use deployment id "
            f"{self.deployment_id!r}, or start `weightsync serve --deployment-id "
            f"{deployment_id}` for it"
        )


#: Where the torch engine serves: "auto" is CUDA when torch sees a device, else the CPU.
EngineDevice = Literal["cpu", "cuda", "auto"]
ENGINE_DEVICES: tuple[str, ...] = get_args(EngineDevice)


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
    #: The deployment this replica serves (default: the model name's last segment).
    deployment_id: str | None = None
    account_id: str = DEFAULT_ACCOUNT_ID
    transition: Transition = "async"
    engine: str = "torch"
    #: Keyword options for the engine's constructor (e.g. {"num_threads": 1} for torch).
    engine_options: dict[str, Any] = field(default_factory=dict)
    #: The torch engine's device (docs/gpu.md); the vLLM engines choose their own.
    device: EngineDevice = "cpu"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Retries of transient storage errors and the time limit of a load's fetch stage.
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    #: Inference executor threads, queue bound (429 past it) and per-request token budget.
    inference: InferenceLimits = field(default_factory=InferenceLimits)
    #: LoRA adapters kept loaded (least recently used unloaded past it); a restart reloads these.
    max_adapters: int = DEFAULT_MAX_ADAPTERS

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
        if self.device not in ENGINE_DEVICES:
            raise InvalidInputError(
                f"unknown device {self.device!r}; choose one of {', '.join(ENGINE_DEVICES)}"
            )
        if self.device != "cpu" and self.engine != "torch":
            raise InvalidInputError(
                f"device {self.device!r} is an option of the torch engine; the {self.engine!r} "
                "engine places the model itself (leave the device at 'cpu')"
            )
        if self.max_adapters < 1:
            raise InvalidInputError(f"max_adapters must be >= 1, got {self.max_adapters}")
        if self.max_body_bytes < 1024:
            raise InvalidInputError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.model_name or "@" in self.model_name:
            raise InvalidInputError(
                f"model name {self.model_name!r} must be non-empty and must not contain '@'"
            )
        validate_identity(self.account_id, what="account id")
        validate_identity(
            self.deployment_id or default_deployment_id(self.model_name), what="deployment id"
        )

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """The engine's constructor options: `engine_options`, plus the torch engine's device."""
        if self.engine != "torch" or self.device == "cpu":
            return dict(self.engine_options)
        return {**self.engine_options, "device": self.device}

    @property
    def served(self) -> ServedDeployment:
        """The account and deployment this replica answers for."""
        return ServedDeployment(
            account_id=self.account_id,
            deployment_id=self.deployment_id or default_deployment_id(self.model_name),
            model_name=self.model_name,
            storage=self.storage,
        )

    @property
    def start_identity(self) -> str:
        """The identity the start source is reported under."""
        if self.snapshot is not None:
            return self.snapshot
        if self.snapshot_name is not None:
            return self.snapshot_name
        return validate_identity(Path(self.model_dir or ".").resolve().name, what="model dir name")
