"""One replica as a process: its launch (a serialized config), its entry point, and a pool.

`weightsync serve` with one replica runs `serve_replica` in its own process. A
gateway over N replicas starts N children with `ReplicaPool`: each is
`python -m weightsync.server <state dir>/replica-<i>/launch.json`, and the file
holds its `ReplicaLaunch` as JSON — the typed configuration the parent built,
read back and validated by the same classes (no command line rebuilt from
flags). The API key reaches a child through its environment (`API_KEY_ENV`),
never its argv or the file. A child stops itself when its parent is gone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from weightsync.errors import InvalidInputError, WeightSyncError
from weightsync.server.config import ReplicaConfig
from weightsync.server.logs import LogFormat, configure_logging
from weightsync.server.processes import (
    API_KEY_ENV,
    ManagedProcess,
    ready_file_url,
    stop_all,
    watch_parent,
)
from weightsync.server.stage_hooks import StageHook, stall_hook_from_env

logger = logging.getLogger(__name__)

LAUNCH_FILE = "launch.json"
READY_FILE = "ready.json"
#: Seconds a pool waits for all its replicas to serve (a model loads in each).
DEFAULT_START_TIMEOUT_S = 600.0
#: Seconds a pool's replicas get to shut down gracefully before SIGKILL.
DEFAULT_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class ReplicaLaunch:
    """What one replica process needs: its configuration and where it listens and reports."""

    replica: ReplicaConfig
    host: str = "127.0.0.1"
    #: 0: any free port (the ready file names the one taken).
    port: int = 0
    #: Written with `{"url", "pid"}` once the replica serves.
    ready_file: Path | None = None
    log_level: str = "info"
    log_format: LogFormat = "text"
    #: The process that started this one (a gateway); the replica stops once it is gone.
    parent_pid: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise InvalidInputError(f"port must be in 0..65535 (0 = any free), got {self.port}")
        if self.log_format not in ("text", "json"):
            raise InvalidInputError(f"log format must be text or json, got {self.log_format!r}")

    def to_json(self) -> str:
        """The launch as JSON, without the API key (that goes through the environment)."""
        doc = _LAUNCH.dump_python(self, mode="json")
        doc["replica"]["api_key"] = None
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, api_key: str | None, where: str) -> ReplicaLaunch:
        """Parse and validate a launch written by `to_json` (`where` names it in errors)."""
        try:
            launch = _LAUNCH.validate_json(text)
        except ValidationError as e:
            raise InvalidInputError(
                f"replica launch {where} is not a valid launch ({e}); it is written by the "
                "gateway that starts the replica: start the deployment with `weightsync serve`"
            ) from e
        replica = dataclasses.replace(launch.replica, api_key=api_key)
        return dataclasses.replace(launch, replica=replica)


_LAUNCH = TypeAdapter(ReplicaLaunch)


def serve_replica(launch: ReplicaLaunch, *, on_stage: StageHook | None = None) -> None:
    """Serve one replica in this process until SIGTERM/SIGINT (logging is the caller's)."""
    from weightsync.server.app import create_app
    from weightsync.server.replica import Replica
    from weightsync.server.runner import bind_socket, serve

    sock = bind_socket(launch.host, launch.port)  # first: a taken port fails before the model
    if launch.parent_pid is not None:
        watch_parent(launch.parent_pid)
    replica = Replica(launch.replica, on_stage=on_stage)
    replica.start()
    serve(create_app(replica), sock, ready_file=launch.ready_file, log_level=launch.log_level)


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`python -m weightsync.server LAUNCH_FILE`: a child replica; the exit code."""
    if len(argv) != 1:
        print(  # logging is not configured yet
            "usage: python -m weightsync.server LAUNCH_FILE (written by `weightsync serve "
            "--replicas N`; start deployments with that command)",
            file=sys.stderr,
        )
        return 2
    path = Path(argv[0])
    try:
        text = path.read_text()
    except OSError as e:
        print(f"cannot read replica launch {path}: {e}", file=sys.stderr)
        return 1
    try:
        launch = ReplicaLaunch.from_json(text, api_key=environ.get(API_KEY_ENV), where=str(path))
    except InvalidInputError as e:
        print(str(e), file=sys.stderr)
        return 1
    configure_logging(
        level=launch.log_level, fmt=launch.log_format, replica_id=launch.replica.replica_id
    )
    try:
        # The fault-matrix tests' stall hook; the environment is read here, at the process edge.
        serve_replica(launch, on_stage=stall_hook_from_env(environ))
    except WeightSyncError as e:
        logger.error("%s", e)
        return 1
    return 0


@dataclass(kw_only=True)
class PoolReplica:
    """One replica process of a pool."""

    replica_id: str
    process: ManagedProcess
    ready_file: Path
    url: str | None = None


class ReplicaPool:
    """Starts and stops the replica processes of one gateway, from one configuration template.

    Replica `i` is the template with `replica_id="replica-<i>"` and its ledger in
    `<state_dir>/replica-<i>`; it listens on a free loopback port.
    """

    def __init__(
        self,
        *,
        num_replicas: int,
        template: ReplicaConfig,
        state_dir: Path,
        log_level: str = "info",
        log_format: LogFormat = "text",
    ) -> None:
        if num_replicas < 1:
            raise InvalidInputError(f"a pool needs at least 1 replica, got {num_replicas}")
        self.num_replicas = num_replicas
        self.template = template
        self.state_dir = Path(state_dir)
        self.log_level = log_level
        self.log_format: LogFormat = log_format
        self.replicas: list[PoolReplica] = []

    def launch(self, index: int) -> ReplicaLaunch:
        """Replica `index`'s launch (its config, a free loopback port, its ready file)."""
        replica_id = f"replica-{index}"
        replica_dir = self.state_dir / replica_id
        return ReplicaLaunch(
            replica=dataclasses.replace(
                self.template, replica_id=replica_id, state_dir=replica_dir
            ),
            host="127.0.0.1",
            port=0,
            ready_file=replica_dir / READY_FILE,
            log_level=self.log_level,
            log_format=self.log_format,
            parent_pid=os.getpid(),
        )

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> list[str]:
        """Start every replica and wait until all serve; return their URLs.

        Raises `DeploymentError` (one exited; the others are stopped) or
        `HotloadTimeoutError` (not all served within `timeout_s`).
        """
        env = dict(os.environ)
        env.pop(API_KEY_ENV, None)
        if self.template.api_key:
            env[API_KEY_ENV] = self.template.api_key
        try:
            for index in range(self.num_replicas):
                launch = self.launch(index)
                ready_file = launch.ready_file or Path()
                launch_file = launch.replica.state_dir / LAUNCH_FILE
                launch_file.parent.mkdir(parents=True, exist_ok=True)
                ready_file.unlink(missing_ok=True)
                launch_file.write_text(launch.to_json())
                command = [sys.executable, "-m", "weightsync.server", str(launch_file)]
                process = ManagedProcess.start(launch.replica.replica_id, command, env=env)
                self.replicas.append(
                    PoolReplica(
                        replica_id=launch.replica.replica_id,
                        process=process,
                        ready_file=ready_file,
                    )
                )
            deadline = time.monotonic() + timeout_s  # one limit for all: they start together
            for r in self.replicas:
                r.url = r.process.wait_ready(
                    functools.partial(ready_file_url, r.ready_file),
                    timeout_s=max(0.0, deadline - time.monotonic()),
                    advice=f"the pool's limit is {timeout_s:.0f}s for all replicas, each loading "
                    "the whole model; give it more time",
                )
        except BaseException:
            self.stop()
            raise
        return [r.url for r in self.replicas if r.url is not None]

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM every replica (graceful), SIGKILL what is left after `timeout_s`."""
        stop_all((r.process for r in self.replicas), timeout_s=timeout_s)

    def alive(self) -> int:
        """How many replica processes still run."""
        return sum(1 for r in self.replicas if r.process.alive())
