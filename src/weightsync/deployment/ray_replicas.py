"""A deployment's replicas as Ray actors across a cluster, behind one local gateway.

Each actor runs one replica (the same `Replica` and HTTP app as a local
replica process) on its node's address and reads snapshots from the shared
storage itself, verifying what it loads; the trainer writes each snapshot once.
The gateway stays where `weightsync serve --ray` runs: one address for the
hot-load API and inference, the same wire contract, a status entry per replica.
Its `ElasticMembership` admits a replica only once it serves the head recorded
in the gateway's state dir (`head.json`), and catches up the ones that start
late or that Ray restarts (`max_restarts`) by replaying the chain and loading the
deployment's LoRA adapters. A replica scaled down is drained first: out of the
gateway's view, its in-flight requests finish (for up to `drain_timeout_s`, then
they are cancelled), then it stops.

Ray is an optional dependency (the `ray` extra): this module imports it only
when a deployment starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI

from weightsync.errors import DeploymentError, InvalidInputError
from weightsync.server.config import ReplicaConfig, ServedDeployment
from weightsync.server.elastic_membership import ElasticMembership, Endpoint
from weightsync.server.gateway import create_gateway_app
from weightsync.server.head_record import HeadRecordFile
from weightsync.snapshot import SnapshotStore
from weightsync.storage import open_storage
from weightsync.wire import SCALE_PATH, ScaleAnswer, ScaleRequest

if TYPE_CHECKING:
    from weightsync.server.replica import Replica
    from weightsync.server.runner import ServerThread

logger = logging.getLogger(__name__)

PlacementStrategy = Literal["SPREAD", "PACK", "DEFAULT"]
#: Seconds one endpoint query waits for all actors before reporting the slow ones missing.
ENDPOINT_WAIT_S = 0.5
HEAD_RECORD_FILE = "head.json"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
#: Beyond the drain's own wait: the replica's shutdown (its load thread, engine, ledger).
REPLICA_CLOSE_S = 30.0


def import_ray() -> Any:
    """The `ray` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise DeploymentError(
            "a deployment on Ray needs the 'ray' extra: pip install 'weightsync[ray]'"
        ) from e
    return ray


@dataclass(frozen=True, kw_only=True)
class RayPlacement:
    """Where and how replicas run on the cluster."""

    #: The cluster to join: "auto", "HOST:PORT" of the head, or a "ray://" client address.
    address: str
    #: Resources one replica reserves (GPUs: 1 per replica on a GPU engine).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: SPREAD places replicas on different nodes while it can.
    strategy: PlacementStrategy = "SPREAD"
    #: Restarts Ray makes of a crashed replica (-1: always).
    max_restarts: int = -1
    #: Where each replica keeps its ledger on its node, under `<deployment id>/<replica id>`
    #: (default: `replicas/` in the gateway's state dir, the same path on every node).
    state_root: str | None = None
    #: Environment the replicas get (storage credentials, endpoint), beside their node's.
    env_vars: dict[str, str] = field(default_factory=dict)
    namespace: str = "weightsync"
    #: How long a replica being scaled down lets its in-flight requests finish before it
    #: cancels them and stops.
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.address:
            raise InvalidInputError("a Ray address is needed: 'auto', 'HOST:PORT' or 'ray://...'")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise InvalidInputError(
                f"replica resources must be >= 0, got {self.num_cpus} CPUs, {self.num_gpus} GPUs"
            )
        if self.strategy not in ("SPREAD", "PACK", "DEFAULT"):
            raise InvalidInputError(
                f"placement strategy must be SPREAD, PACK or DEFAULT, got {self.strategy!r}"
            )
        if self.max_restarts < -1:
            raise InvalidInputError(f"max_restarts must be >= -1, got {self.max_restarts}")
        if not self.drain_timeout_s >= 0:
            raise InvalidInputError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


class ReplicaActor:
    """One replica served over HTTP from inside a Ray actor (wrapped by `ray.remote`)."""

    def __init__(self, config: ReplicaConfig, host: str | None) -> None:
        from weightsync.server.app import create_app
        from weightsync.server.replica import Replica
        from weightsync.server.runner import ServerThread

        ray = import_ray()
        self.replica = Replica(config)
        self.replica.start()  # its ledger's last verified load, else its start snapshot
        bind = host or ray.util.get_node_ip_address()
        self.server = ServerThread(create_app(self.replica), host=bind, port=0)
        self.url = self.server.start()
        self.node_id = str(ray.get_runtime_context().get_node_id())
        self.incarnation = f"{os.getpid()}@{time.time_ns()}"

    def endpoint(self) -> dict[str, str]:
        return {"url": self.url, "incarnation": self.incarnation, "node_id": self.node_id}

    def drain(self, timeout_s: float) -> int:
        """Stop the server gracefully; how many inference requests it had to cancel.

        See `drain_server`: no new connection is accepted, in-flight requests run to
        their end for up to `timeout_s`, what is left is cancelled, then it stops.
        """
        return drain_server(self.server, self.replica, timeout_s=timeout_s)

    def stop(self) -> None:
        self.server.stop()


def in_flight(replica: Replica) -> int:
    """Inference requests `replica` has admitted and not finished (running or queued)."""
    registry = replica.metrics.registry
    running = registry.get_sample_value("weightsync_inference_running") or 0.0
    queued = registry.get_sample_value("weightsync_inference_queued") or 0.0
    return int(running + queued)


def drain_server(server: ServerThread, replica: Replica, *, timeout_s: float) -> int:
    """Shut `server` (serving `replica`) down gracefully; the requests it had to cancel.

    Uvicorn's graceful shutdown: it stops accepting connections, closes idle ones and
    lets open requests (a streamed completion too) run to their end, for up to
    `timeout_s` (whole seconds, rounded up); then it cancels what is left and runs the
    app's shutdown. The caller takes the replica out of every client's view first.
    """
    grace_s = math.ceil(timeout_s)
    server.server.config.timeout_graceful_shutdown = grace_s
    deadline = time.monotonic() + grace_s
    server.server.should_exit = True
    left = in_flight(replica)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = in_flight(replica)
    if left:
        logger.warning(
            "%s: %d inference requests still running after the %ds drain; cancelling them",
            replica.config.replica_id, left, grace_s,
        )  # fmt: skip
    server.stop(timeout_s=grace_s + REPLICA_CLOSE_S)
    return left


@dataclass(kw_only=True)
class _Handle:
    replica_id: str
    actor: Any
    pending: Any = None
    last: dict[str, str] | None = None


class RayReplicaSet:
    """The deployment's replica actors: created, scaled, queried for where they answer."""

    def __init__(
        self,
        *,
        deployment_id: str,
        template: ReplicaConfig,
        placement: RayPlacement,
        state_root: Path,
        host: str | None = None,
    ) -> None:
        self.deployment_id = deployment_id
        self.template = template
        self.placement = placement
        self.state_root = Path(placement.state_root) if placement.state_root else state_root
        self.host = host
        self._handles: list[_Handle] = []
        self._next_index = 0
        self._ray = import_ray()

    def _replica_config(self, replica_id: str, start_identity: str) -> ReplicaConfig:
        state_dir = self.state_root / self.deployment_id / replica_id
        return dataclasses.replace(
            self.template, replica_id=replica_id, state_dir=state_dir, snapshot=start_identity
        )

    def add(self, start_identity: str) -> str:
        """Start one more replica from `start_identity` (the head: a materialized chain)."""
        replica_id = f"replica-{self._next_index}"
        self._next_index += 1
        p = self.placement
        options: dict[str, Any] = {
            "num_cpus": p.num_cpus,
            "num_gpus": p.num_gpus,
            "max_restarts": p.max_restarts,
            "max_task_retries": 0,
            "scheduling_strategy": p.strategy,
            "name": f"{self.deployment_id}-{replica_id}",
            "namespace": p.namespace,
        }
        if p.env_vars:
            options["runtime_env"] = {"env_vars": dict(p.env_vars)}
        remote_class = self._ray.remote(ReplicaActor)
        actor = remote_class.options(**options).remote(
            self._replica_config(replica_id, start_identity), self.host
        )
        self._handles.append(_Handle(replica_id=replica_id, actor=actor))
        logger.info("started %s from %s on the Ray cluster", replica_id, start_identity)
        return replica_id

    def detach(self, replica_id: str | None = None) -> Any:
        """Take `replica_id` (default: the newest) out of the set; its handle, or None."""
        for i in range(len(self._handles) - 1, -1, -1):
            if replica_id is None or self._handles[i].replica_id == replica_id:
                return self._handles.pop(i)
        return None

    def kill(self, handle: Any) -> None:
        """Stop a detached replica for good (Ray does not restart it)."""
        self._ray.kill(handle.actor, no_restart=True)
        logger.info("stopped %s", handle.replica_id)

    def drain(self, handles: list[Any]) -> dict[str, int | None]:
        """Drain detached replicas at once (see `ReplicaActor.drain`): for each, the requests
        it cancelled, or None where it did not answer (gone, or hung past the bound)."""
        timeout_s = self.placement.drain_timeout_s
        refs = {h.replica_id: h.actor.drain.remote(timeout_s) for h in handles}
        bound_s = math.ceil(timeout_s) + REPLICA_CLOSE_S + ENDPOINT_WAIT_S
        self._ray.wait(list(refs.values()), num_returns=len(refs), timeout=bound_s)
        cancelled: dict[str, int | None] = {}
        for replica_id, ref in refs.items():
            try:
                cancelled[replica_id] = int(self._ray.get(ref, timeout=0))
            except (self._ray.exceptions.RayError, TimeoutError) as e:
                logger.warning("%s did not drain (%s); stopping it", replica_id, e)
                cancelled[replica_id] = None
        return cancelled

    def __len__(self) -> int:
        return len(self._handles)

    def actor(self, replica_id: str) -> Any:
        """The actor handle of `replica_id` (tests kill it; operators inspect it)."""
        for handle in self._handles:
            if handle.replica_id == replica_id:
                return handle.actor
        raise InvalidInputError(f"no replica {replica_id!r} in deployment {self.deployment_id!r}")

    def endpoints(self) -> list[Endpoint]:
        """Where each replica answers; one that does not answer in time is reported missing."""
        ray = self._ray
        handles = list(self._handles)
        for handle in handles:
            if handle.pending is None:
                handle.pending = handle.actor.endpoint.remote()
        refs = [h.pending for h in handles]
        ready, _ = (
            ray.wait(refs, num_returns=len(refs), timeout=ENDPOINT_WAIT_S) if refs else ([], [])
        )
        done = set(ready)
        endpoints = []
        for handle in handles:
            if handle.pending not in done:
                problem = "not answering (starting, restarting, or its node is gone)"
                endpoints.append(Endpoint(replica_id=handle.replica_id, url=None, problem=problem))
                continue
            ref, handle.pending = handle.pending, None
            try:
                handle.last = ray.get(ref)
            except ray.exceptions.RayError as e:
                problem = f"actor unavailable: {type(e).__name__}: {str(e).splitlines()[0]}"
                endpoints.append(Endpoint(replica_id=handle.replica_id, url=None, problem=problem))
                continue
            last = handle.last or {}
            endpoints.append(
                Endpoint(
                    replica_id=handle.replica_id,
                    url=last.get("url"),
                    incarnation=last.get("incarnation"),
                )
            )
        return endpoints

    def nodes(self) -> dict[str, str]:
        """The node id each replica last reported (replicas not answering are left out)."""
        return {h.replica_id: h.last["node_id"] for h in self._handles if h.last is not None}

    def stop(self) -> None:
        while (handle := self.detach()) is not None:
            self.kill(handle)


class RayDeployment:
    """Replicas on a Ray cluster, their membership, and the gateway app in front of them."""

    def __init__(
        self,
        *,
        template: ReplicaConfig,
        placement: RayPlacement,
        state_dir: Path,
        served: ServedDeployment,
        api_key: str | None = None,
        max_body_bytes: int,
        host: str | None = None,
        poll_interval_s: float = 0.2,
    ) -> None:
        if template.snapshot is None:
            raise InvalidInputError(
                "replicas on Ray start from a snapshot in shared storage (--storage, --snapshot): "
                "a model directory on this machine is not on the cluster's nodes"
            )
        self.placement = placement
        self.served = served
        self.storage_url = template.storage or ""
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=placement.address, namespace=placement.namespace)
        self.replicas = RayReplicaSet(
            deployment_id=served.deployment_id,
            template=template,
            placement=placement,
            state_root=Path(state_dir) / "replicas",
            host=host,
        )
        self.membership = ElasticMembership(
            self.replicas,
            HeadRecordFile(Path(state_dir) / HEAD_RECORD_FILE),
            start_identity=template.snapshot,
            transition=template.transition,
            api_key=api_key,
            poll_interval_s=poll_interval_s,
            is_adapter=self._is_adapter,
            max_adapters=template.max_adapters,
        )
        self._store: SnapshotStore | None = None
        self._scale_lock = threading.Lock()
        self.app: FastAPI = create_gateway_app(
            [],
            api_key=api_key,
            max_body_bytes=max_body_bytes,
            served=served,
            membership=self.membership,
        )
        self.app.add_api_route(SCALE_PATH, self._scale_route, methods=["POST"])

    async def _scale_route(self, body: ScaleRequest) -> ScaleAnswer:
        """`POST /hot_load/v1/deployment/scale {"replicas": N}` (the gateway's API key)."""
        cancelled = await asyncio.to_thread(self.scale, body.replicas)
        return ScaleAnswer(
            replicas=len(self.replicas), cancelled=cancelled, membership=self.membership.view()
        )

    def _is_adapter(self, identity: str) -> bool:
        if self._store is None:
            self._store = SnapshotStore(open_storage(self.storage_url))
        return self._store.read_manifest(identity).kind == "lora"

    def start(self, num_replicas: int, *, timeout_s: float = 600.0) -> None:
        """Start `num_replicas` replicas and wait until every one serves the head (or stop)."""
        self.membership.start()
        try:
            self.scale(num_replicas)
            self.membership.wait_until(num_admitted=num_replicas, timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise

    def scale(self, num_replicas: int) -> dict[str, int | None]:
        """Add replicas (they start at the head and are admitted once they serve it with the
        deployment's adapters) or stop some: missing ones first, then those catching up,
        then the newest admitted ones. Each is withdrawn from traffic, drained (its
        in-flight requests finish, for up to `drain_timeout_s`, then are cancelled) and
        stopped. Returns, per stopped replica, the requests its drain cancelled (None: it
        was missing, or did not answer)."""
        if num_replicas < 0:
            raise InvalidInputError(f"replicas must be >= 0, got {num_replicas}")
        with self._scale_lock:  # one resize at a time (Python callers and the scale route)
            return self._scale(num_replicas)

    def _scale(self, num_replicas: int) -> dict[str, int | None]:
        while len(self.replicas) < num_replicas:
            self.replicas.add(self.membership.record.head)
        view = self.membership.view()
        spare = [*view.missing, *view.catching_up, *reversed(view.admitted)]
        handles = []
        while len(self.replicas) > num_replicas:
            handle = self.replicas.detach(spare.pop(0) if spare else None)
            handles.append(handle or self.replicas.detach())
        for handle in handles:
            # Out of the gateway's view before it drains: no new request reaches it.
            self.membership.wait_until_absent(handle.replica_id, timeout_s=30.0)
        missing = set(view.missing)
        cancelled: dict[str, int | None] = {h.replica_id: None for h in handles}
        cancelled.update(self.replicas.drain([h for h in handles if h.replica_id not in missing]))
        for handle in handles:
            self.replicas.kill(handle)
        return cancelled

    def stop(self) -> None:
        self.membership.stop()
        self.replicas.stop()
