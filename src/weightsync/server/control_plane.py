"""The Fireworks control plane, as far as a running deployment can answer it truthfully.

The Fireworks SDK's `DeploymentManager` resolves its account (`GET
/v1/accounts?pageSize=2`) before any hot-load or status call, and reads and
manages deployments under `/v1/accounts/{a}/deployments/{d}`. A weightsync
server is one deployment that already runs, so:

- `GET /v1/accounts`: the one account the server answers for (`--account-id`);
- `GET .../deployments/{d}`: the served deployment in the SDK's shape; READY
  while every replica serves a verified snapshot (a hot-load in flight does not
  change that), UPDATING while only some do, FAILED when none does;
- `POST .../deployments?deploymentId={d}` (`create_or_get`): 409 for the served
  deployment, on which the SDK fetches and returns it; 400 for another id;
- `PATCH .../deployments/{d}` (`update`, `scale_to_zero`): a no-op that returns
  the deployment when every field sent already holds; otherwise 400 naming the
  fields and how to change them (restart with other flags);
- `DELETE .../deployments/{d}`: 400 (stop the process instead).

Every refusal is a 4xx the SDK does not retry, so none of its calls waits
(`delete` and `scale_to_zero` log the message and return). A request for another
account or deployment gets a 404 that names the served one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query

from weightsync.errors import (
    DeploymentConflictError,
    DeploymentNotFoundError,
    UnsupportedOperationError,
)
from weightsync.server.config import ServedDeployment
from weightsync.wire import (
    ACCOUNTS_PATH,
    DEPLOYMENT_PATH,
    DEPLOYMENTS_PATH,
    Account,
    AccountList,
    Deployment,
    DeploymentCreate,
    DeploymentState,
    DeploymentStatus,
    DeploymentUpdate,
    HotLoadTransitionType,
    ReplicaStats,
    ReplicaStatus,
    Transition,
    account_name,
)


@dataclass(frozen=True, kw_only=True)
class DeploymentView:
    """What the server knows of its replicas right now."""

    num_replicas: int
    serving_replicas: int
    transition: Transition | None
    #: Why a replica does not serve, one line each ("replica-1: unreachable ...").
    problems: tuple[str, ...] = ()

    @classmethod
    def from_statuses(cls, statuses: Sequence[ReplicaStatus]) -> DeploymentView:
        """A replica serves when it reports a snapshot and is not degraded."""
        problems = []
        serving = 0
        for s in statuses:
            if s.current_snapshot_identity is not None and s.degraded is None:
                serving += 1
            else:
                why = s.degraded or s.loading_state.error or "serves no snapshot yet"
                problems.append(f"{s.replica_id}: {why}")
        transitions = [s.transition for s in statuses if s.transition is not None]
        return cls(
            num_replicas=len(statuses),
            serving_replicas=serving,
            transition=transitions[0] if transitions else None,
            problems=tuple(problems),
        )

    @property
    def state(self) -> DeploymentState:
        if self.num_replicas and self.serving_replicas == self.num_replicas:
            return "READY"
        return "UPDATING" if self.serving_replicas else "FAILED"


def _fireworks_transition(transition: Transition | None) -> HotLoadTransitionType | None:
    if transition is None:
        return None
    return "SYNC" if transition == "sync" else "ASYNC"


@dataclass
class ControlPlane:
    """Builds the served deployment's resource and judges control-plane requests."""

    served: ServedDeployment
    describe: Callable[[], Awaitable[DeploymentView]]
    created_at: str = field(
        default_factory=lambda: (
            datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
    )

    def accounts(self) -> AccountList:
        account = Account(
            name=account_name(self.served.account_id), display_name=self.served.account_id
        )
        return AccountList(accounts=[account], total_size=1)

    def check(self, account_id: str, deployment_id: str | None = None) -> None:
        """Raise `DeploymentNotFoundError` unless the path names the served account/deployment."""
        if account_id != self.served.account_id or (
            deployment_id is not None and deployment_id != self.served.deployment_id
        ):
            raise DeploymentNotFoundError(
                self.served.not_served(
                    account_id, deployment_id or self.served.deployment_id, "the request path"
                )
            )

    async def resource(self) -> Deployment:
        view = await self.describe()
        state = view.state
        if state == "READY":
            status = DeploymentStatus(code="OK", message="")
        else:
            status = DeploymentStatus(
                code="UNAVAILABLE",
                message=(
                    f"{view.serving_replicas} of {view.num_replicas} replicas serve: "
                    + "; ".join(view.problems)
                ),
            )
        return Deployment(
            name=self.served.name,
            display_name=self.served.deployment_id,
            base_model=self.served.model_name,
            state=state,
            status=status,
            create_time=self.created_at,
            min_replica_count=view.num_replicas,
            max_replica_count=view.num_replicas,
            replica_count=view.num_replicas,
            desired_replica_count=view.num_replicas,
            replica_stats=ReplicaStats(ready_replica_count=view.serving_replicas),
            hot_load_bucket_url=self.served.storage,
            hot_load_transition_type=_fireworks_transition(view.transition),
            description=f"weightsync deployment {self.served.deployment_id}",
        )

    def refuse_create(
        self, deployment_id: str
    ) -> DeploymentConflictError | UnsupportedOperationError:
        if deployment_id == self.served.deployment_id:
            return DeploymentConflictError(
                f"deployment {self.served.name!r} already exists: this server runs it; "
                f"GET {self.served.name} to use it"
            )
        return UnsupportedOperationError(
            f"this server runs only deployment {self.served.name!r} and cannot create "
            f"{deployment_id!r}; use deployment id {self.served.deployment_id!r}, or start "
            f"`weightsync serve --deployment-id {deployment_id}` for it"
        )

    def refuse_delete(self) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"deployment {self.served.name!r} is a running `weightsync serve` process and is "
            "not deleted over HTTP; stop that process (SIGTERM or Ctrl-C) to delete it — "
            "nothing was changed"
        )

    async def update(self, body: DeploymentUpdate) -> Deployment:
        """The served deployment if `body` changes nothing; else raise, naming what differs."""
        current = await self.resource()
        sent = body.model_dump(exclude_unset=True)
        problems = []
        for name, value in sent.items():
            problem = self._unchangeable(name, value, current)
            if problem is not None:
                problems.append(problem)
        if problems:
            raise UnsupportedOperationError(
                f"deployment {self.served.name!r} cannot be changed over HTTP: "
                + "; ".join(problems)
                + " — nothing was changed"
            )
        return current

    def _unchangeable(self, name: str, value: Any, current: Deployment) -> str | None:
        count = current.replica_count
        if name in ("min_replica_count", "max_replica_count"):
            if value == count:
                return None
            if value == 0:
                return (
                    f"it runs a fixed {count} replica(s) and cannot scale to zero; stop the "
                    "`weightsync serve` process to release its accelerators"
                )
            return (
                f"it runs a fixed {count} replica(s), not {value}; restart "
                f"`weightsync serve --replicas {value}` to change that"
            )
        if name == "hot_load_transition_type":
            wanted = str(value or "").strip().upper()
            served = current.hot_load_transition_type
            if wanted in ("", "UNSPECIFIED", "HOT_LOAD_TRANSITION_TYPE_UNSPECIFIED", served):
                return None
            return (
                f"its transition is {served}, not {wanted}; restart `weightsync serve "
                f"--transition {wanted.lower()}` to change it"
            )
        if name == "hot_load_trainer_job":
            if not value:
                return None
            return (
                f"it has no trainer job to attach ({value!r}): the trainer writes snapshots to "
                f"the storage it loads from ({self.served.storage or 'none configured'})"
            )
        if value == getattr(current, name, None):
            return None
        return f"{name} is {getattr(current, name, None)!r} here, not {value!r}"


def build_control_plane_router(plane: ControlPlane) -> APIRouter:
    """The control-plane routes over `plane` (replica and gateway alike)."""
    router = APIRouter()

    @router.get(ACCOUNTS_PATH, response_model_by_alias=True)
    async def list_accounts(
        page_size: int | None = Query(default=None, alias="pageSize", ge=0),
    ) -> AccountList:
        return plane.accounts()

    @router.get(DEPLOYMENT_PATH, response_model_by_alias=True)
    async def get_deployment(account_id: str, deployment_id: str) -> Deployment:
        plane.check(account_id, deployment_id)
        return await plane.resource()

    @router.post(DEPLOYMENTS_PATH)
    async def create_deployment(
        account_id: str,
        body: DeploymentCreate,
        deployment_id: str = Query(alias="deploymentId", min_length=1),
    ) -> Deployment:
        plane.check(account_id)
        raise plane.refuse_create(deployment_id)

    @router.patch(DEPLOYMENT_PATH, response_model_by_alias=True)
    async def update_deployment(
        account_id: str,
        deployment_id: str,
        body: DeploymentUpdate,
        update_mask: str | None = Query(default=None, alias="updateMask"),
    ) -> Deployment:
        plane.check(account_id, deployment_id)
        return await plane.update(body)

    @router.delete(DEPLOYMENT_PATH)
    async def delete_deployment(account_id: str, deployment_id: str) -> Deployment:
        plane.check(account_id, deployment_id)
        raise plane.refuse_delete()

    return router
