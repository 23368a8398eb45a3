"""Local deployments: `weightsync serve` processes on this machine, and their registry.

A local deployment is one `weightsync serve` process group (its replicas and
gateway are children of it). Each is recorded as a small JSON file under the
registry directory, so `DeploymentManager.get`/`delete` work from another
process than the one that spawned it. Starting, waiting and stopping follow the
one rule of `server.processes`: stopped by process group, SIGTERM first (graceful
shutdown), SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from weightsync.errors import DeploymentError, InvalidInputError
from weightsync.identity import validate_identity
from weightsync.server.processes import API_KEY_ENV, ManagedProcess, ready_file_url
from weightsync.wire import TRANSITIONS, Transition

logger = logging.getLogger(__name__)

EngineName = Literal["torch", "vllm"]
RayPlacementStrategy = Literal["SPREAD", "PACK", "DEFAULT"]
DeploymentState = Literal["running", "stopped"]

#: Seconds a deployment gets to shut down gracefully before SIGKILL.
STOP_TIMEOUT_S = 15.0


def default_registry_dir() -> Path:
    """Where local deployments are recorded unless told otherwise."""
    return Path.home() / ".cache" / "weightsync" / "deployments"


@dataclass(frozen=True, kw_only=True)
class DeploymentConfig:
    """A local deployment: which model to serve, from which storage, how.

    Exactly one of `snapshot` (a base snapshot identity in `storage`) or
    `model_dir` (a Hugging Face model directory) names the initial weights.
    """

    deployment_id: str
    storage: str
    snapshot: str | None = None
    model_dir: str | None = None
    replicas: int = 1
    transition: Transition = "async"
    engine: EngineName = "torch"
    #: The torch engine's device: "cpu", "cuda" or "auto" (`weightsync serve --device`).
    device: str = "cpu"
    port: int = 0
    host: str = "127.0.0.1"
    api_key: str | None = None
    state_dir: str | None = None
    model_name: str | None = None
    #: Seconds to wait for the spawned deployment to answer `/health`.
    startup_timeout_s: float = 180.0
    #: Extra `weightsync serve` arguments, passed through verbatim.
    extra_args: tuple[str, ...] = ()
    #: Run the replicas as actors on this Ray cluster ("auto", "HOST:PORT", "ray://...");
    #: the gateway stays on this machine (docs/scale.md). None: local replica processes.
    ray_address: str | None = None
    #: Resources each replica reserves on the cluster, and how replicas are placed.
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0
    ray_placement: RayPlacementStrategy = "SPREAD"
    #: Seconds a replica being scaled down lets its in-flight requests finish before it
    #: cancels them (`--drain-timeout-s`); None: `weightsync serve`'s default (30).
    ray_drain_timeout_s: float | None = None

    def __post_init__(self) -> None:
        validate_identity(self.deployment_id, what="deployment id")
        if (self.snapshot is None) == (self.model_dir is None):
            raise InvalidInputError(
                f"deployment {self.deployment_id!r}: give exactly one of snapshot= "
                "(a base snapshot identity in storage) or model_dir= (a Hugging Face model dir)"
            )
        if self.replicas < 1:
            raise InvalidInputError(f"replicas must be >= 1, got {self.replicas}")
        if self.transition not in TRANSITIONS:
            raise InvalidInputError(
                f"transition must be 'async' or 'sync', got {self.transition!r}"
            )
        if self.engine not in ("torch", "vllm"):
            raise InvalidInputError(f"engine must be 'torch' or 'vllm', got {self.engine!r}")
        if not 0 <= self.port < 65536:
            raise InvalidInputError(
                f"port must be in 0..65535 (0 = any free port), got {self.port}"
            )
        if self.startup_timeout_s <= 0:
            raise InvalidInputError("startup_timeout_s must be > 0")
        if self.ray_address is not None and self.snapshot is None:
            raise InvalidInputError(
                f"deployment {self.deployment_id!r}: replicas on Ray start from a snapshot in "
                "shared storage (snapshot=); a model_dir on this machine is not on the cluster"
            )
        if self.ray_num_cpus < 0 or self.ray_num_gpus < 0:
            raise InvalidInputError("ray_num_cpus and ray_num_gpus must be >= 0")
        if self.ray_placement not in ("SPREAD", "PACK", "DEFAULT"):
            raise InvalidInputError(
                f"ray_placement must be SPREAD, PACK or DEFAULT, got {self.ray_placement!r}"
            )
        if self.ray_drain_timeout_s is not None and not (
            self.ray_address is not None and self.ray_drain_timeout_s >= 0
        ):
            raise InvalidInputError(
                f"deployment {self.deployment_id!r}: ray_drain_timeout_s must be >= 0 and "
                f"needs ray_address= (only a deployment on Ray is scaled), got "
                f"{self.ray_drain_timeout_s} with ray_address={self.ray_address!r}"
            )

    def serve_args(self, *, state_dir: Path, ready_file: Path) -> list[str]:
        """The `weightsync serve` arguments (the API key goes through the environment)."""
        args = ["serve", "--storage", str(self.storage)]
        if self.snapshot is not None:
            args += ["--snapshot", self.snapshot]
        else:
            args += ["--model-dir", str(self.model_dir)]
        args += [
            "--replicas", str(self.replicas),
            "--host", self.host,
            "--port", str(self.port),
            "--transition", self.transition,
            "--engine", self.engine,
            "--device", self.device,
            "--state-dir", str(state_dir),
            "--ready-file", str(ready_file),
            "--deployment-id", self.deployment_id,
        ]  # fmt: skip
        if self.model_name:
            args += ["--model-name", self.model_name]
        if self.ray_address is not None:
            args += [
                "--ray", self.ray_address,
                "--ray-num-cpus", str(self.ray_num_cpus),
                "--ray-num-gpus", str(self.ray_num_gpus),
                "--ray-placement", self.ray_placement,
            ]  # fmt: skip
            if self.ray_drain_timeout_s is not None:
                args += ["--drain-timeout-s", str(self.ray_drain_timeout_s)]
        return args + list(self.extra_args)


@dataclass(kw_only=True)
class DeploymentInfo:
    """What the registry knows about one local deployment."""

    deployment_id: str
    url: str | None
    pid: int | None
    state: DeploymentState
    config: dict[str, Any] = field(default_factory=dict)
    state_dir: str = ""
    log_file: str = ""
    process_create_time: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentInfo:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class LocalRegistry:
    """Local deployments recorded as `<root>/<deployment_id>/deployment.json`."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry_dir()

    def deployment_dir(self, deployment_id: str) -> Path:
        return self.root / validate_identity(deployment_id, what="deployment id")

    def read(self, deployment_id: str) -> DeploymentInfo | None:
        path = self.deployment_dir(deployment_id) / "deployment.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DeploymentError(
                f"deployment record {path} is unreadable ({e}); delete that directory to forget it"
            ) from e
        info = DeploymentInfo.from_dict(data)
        if info.state == "running" and not process_alive(info):
            info.state = "stopped"
        return info

    def write(self, info: DeploymentInfo) -> None:
        directory = self.deployment_dir(info.deployment_id)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "deployment.json.tmp"
        tmp.write_text(info.to_json() + "\n")
        tmp.replace(directory / "deployment.json")

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/deployment.json"))


def _process(info: DeploymentInfo) -> ManagedProcess | None:
    """The recorded `weightsync serve` process (its own process group), if one was recorded."""
    if info.pid is None:
        return None
    return ManagedProcess.attach(
        f"deployment {info.deployment_id!r}",
        info.pid,
        create_time=info.process_create_time,
        log_file=Path(info.log_file) if info.log_file else None,
    )


def process_alive(info: DeploymentInfo) -> bool:
    """True when the recorded process still runs (and is the same process, not a reused pid)."""
    process = _process(info)
    return process is not None and process.alive()


def spawn(config: DeploymentConfig, registry: LocalRegistry) -> DeploymentInfo:
    """Start `weightsync serve` for `config`, wait until it answers `/health`, record it."""
    directory = registry.deployment_dir(config.deployment_id)
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = Path(config.state_dir) if config.state_dir else directory / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    ready_file = directory / "ready.json"
    ready_file.unlink(missing_ok=True)
    log_file = directory / "serve.log"
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if config.api_key:
        env[API_KEY_ENV] = config.api_key  # not on the command line, where ps shows it
    command = [
        sys.executable,
        "-m",
        "weightsync.cli",
        *config.serve_args(state_dir=state_dir, ready_file=ready_file),
    ]
    # Its own process group, so stop() reaches every replica it starts.
    process = ManagedProcess.start(
        f"deployment {config.deployment_id!r}", command, env=env, log_file=log_file, own_group=True
    )
    info = DeploymentInfo(
        deployment_id=config.deployment_id,
        url=None,
        pid=process.pid,
        state="running",
        config=_config_record(config),
        state_dir=str(state_dir),
        log_file=str(log_file),
        process_create_time=process.create_time,
    )
    registry.write(info)
    try:
        info.url = process.wait_ready(
            functools.partial(_serving_url, config, ready_file),
            timeout_s=config.startup_timeout_s,
            advice="raise DeploymentConfig.startup_timeout_s if the model is large",
        )
    except BaseException:
        process.stop(timeout_s=STOP_TIMEOUT_S)
        info.state = "stopped"
        info.pid = None
        registry.write(info)
        raise
    registry.write(info)
    logger.info("deployment %s: serving at %s (pid %d)", config.deployment_id, info.url, info.pid)
    return info


def _config_record(config: DeploymentConfig) -> dict[str, Any]:
    record = asdict(config)
    record["extra_args"] = list(config.extra_args)
    record["api_key"] = None  # never written to disk
    return record


def _serving_url(config: DeploymentConfig, ready_file: Path) -> str | None:
    """The URL the ready file names once it answers `/health`; None until then."""
    url = ready_file_url(ready_file)
    if url is None:
        return None
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        if httpx.get(f"{url}/health", headers=headers, timeout=5.0).status_code == 200:
            return url
    except httpx.HTTPError:
        pass  # not answering yet: the caller polls until its deadline
    return None


def stop(info: DeploymentInfo, *, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the deployment's process group; return True if a running process was stopped."""
    process = _process(info)
    return process is not None and process.stop(timeout_s=timeout_s)
