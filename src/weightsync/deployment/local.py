"""Local deployments: `weightsync serve` processes on this machine, and their registry.

A local deployment is one `weightsync serve` process group (its replicas and
gateway are children of it). Each is recorded as a small JSON file under the
registry directory, so `DeploymentManager.get`/`delete` work from another
process than the one that spawned it. Processes are stopped by process group:
SIGTERM first (graceful shutdown), SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

from weightsync.errors import DeploymentError, HotloadTimeoutError, InvalidInputError
from weightsync.identity import validate_identity
from weightsync.wire import TRANSITIONS, Transition

logger = logging.getLogger(__name__)

EngineName = Literal["torch", "vllm"]
RayPlacementStrategy = Literal["SPREAD", "PACK", "DEFAULT"]
DeploymentState = Literal["running", "stopped"]

LOG_TAIL_CHARS = 4000


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


def process_alive(info: DeploymentInfo) -> bool:
    """True when the recorded process still runs (and is the same process, not a reused pid)."""
    if info.pid is None:
        return False
    try:
        proc = psutil.Process(info.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.Error:
        return False
    return info.process_create_time is None or abs(created - info.process_create_time) < 1.0


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
    env.pop("WEIGHTSYNC_API_KEY", None)
    if config.api_key:
        env["WEIGHTSYNC_API_KEY"] = config.api_key  # not on the command line, where ps shows it
    command = [
        sys.executable,
        "-m",
        "weightsync.cli",
        *config.serve_args(state_dir=state_dir, ready_file=ready_file),
    ]
    logger.info("deployment %s: starting %s", config.deployment_id, " ".join(command))
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so stop() reaches every replica
        )
    info = DeploymentInfo(
        deployment_id=config.deployment_id,
        url=None,
        pid=proc.pid,
        state="running",
        config=_config_record(config),
        state_dir=str(state_dir),
        log_file=str(log_file),
        process_create_time=_create_time(proc.pid),
    )
    registry.write(info)
    try:
        info.url = _wait_until_serving(config, proc, ready_file, log_file)
    except BaseException:
        stop(info)
        info.state = "stopped"
        info.pid = None
        registry.write(info)
        raise
    registry.write(info)
    logger.info("deployment %s: serving at %s (pid %d)", config.deployment_id, info.url, proc.pid)
    return info


def _config_record(config: DeploymentConfig) -> dict[str, Any]:
    record = asdict(config)
    record["extra_args"] = list(config.extra_args)
    record["api_key"] = None  # never written to disk
    return record


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _wait_until_serving(
    config: DeploymentConfig, proc: subprocess.Popen[bytes], ready_file: Path, log_file: Path
) -> str:
    deadline = time.monotonic() + config.startup_timeout_s
    url: str | None = None
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise DeploymentError(
                f"deployment {config.deployment_id!r}: `weightsync serve` exited with code {code} "
                f"before it was ready. Its log ({log_file}) ends with:\n{log_tail(log_file)}"
            )
        if url is None and ready_file.exists():
            with contextlib.suppress(ValueError, OSError):
                url = str(json.loads(ready_file.read_text())["url"]).rstrip("/")
        if url is not None:
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=5.0).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass  # not answering yet: keep polling until the deadline
        time.sleep(0.1)
    raise HotloadTimeoutError(
        f"deployment {config.deployment_id!r} did not answer /health within "
        f"{config.startup_timeout_s:.0f}s (raise DeploymentConfig.startup_timeout_s if the model "
        f"is large). Its log ({log_file}) ends with:\n{log_tail(log_file)}"
    )


def log_tail(log_file: str | Path, num_chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = Path(log_file).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-num_chars:]


def stop(info: DeploymentInfo, *, timeout_s: float = 15.0) -> bool:
    """Stop the deployment's process group; return True if a running process was stopped."""
    if not process_alive(info) or info.pid is None:
        return False
    pid = info.pid
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    logger.info("deployment %s: stopping process group %d", info.deployment_id, pgid)
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_exit(pid, timeout_s):
        logger.warning(
            "deployment %s: process %d ignored SIGTERM for %.0fs; killing it",
            info.deployment_id,
            pid,
            timeout_s,
        )
        _signal_group(pgid, signal.SIGKILL)
        _wait_exit(pid, 5.0)
    # Children that outlived their parent (same group) get the same treatment.
    _signal_group(pgid, signal.SIGKILL)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=timeout_s)
    except psutil.TimeoutExpired:
        return False
    except psutil.Error:
        return True
    return True
