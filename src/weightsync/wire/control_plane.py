"""The Fireworks control-plane shapes the SDK's `DeploymentManager` sends and parses.

Field names are Fireworks' camelCase (`baseModel`, `hotLoadTransitionType`);
models are built with the Python names and dumped `by_alias`. Only the subset
the SDK reads or a deployment served by `weightsync serve` can state truthfully
is modelled; unknown fields are kept (a tolerant reader).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

#: Fireworks' deployment states; the SDK waits for READY and gives up on FAILED/DELETED/DELETING.
DeploymentState = Literal[
    "STATE_UNSPECIFIED", "CREATING", "READY", "DELETING", "FAILED", "UPDATING", "DELETED"
]
#: Fireworks' spelling of the transition (`Transition` upper-cased).
HotLoadTransitionType = Literal["ASYNC", "SYNC"]
#: google.rpc codes the deployment's `status` uses here.
StatusCode = Literal["OK", "UNAVAILABLE", "FAILED_PRECONDITION", "INTERNAL"]

_ACCOUNTS = "accounts/"
_DEPLOYMENTS = "/deployments/"


def account_name(account_id: str) -> str:
    """`accounts/{account_id}`: the account's resource name."""
    return f"{_ACCOUNTS}{account_id}"


def deployment_name(account_id: str, deployment_id: str) -> str:
    """`accounts/{account_id}/deployments/{deployment_id}`: the deployment's resource name.

    The SDK sends it as the `fireworks-deployment` header and as the `model` of
    its completions.
    """
    return f"{_ACCOUNTS}{account_id}{_DEPLOYMENTS}{deployment_id}"


def parse_deployment_name(name: str) -> tuple[str, str] | None:
    """`(account_id, deployment_id)` of a deployment resource name, or None if it is not one."""
    if not name.startswith(_ACCOUNTS) or _DEPLOYMENTS not in name:
        return None
    account_id, _, deployment_id = name[len(_ACCOUNTS) :].partition(_DEPLOYMENTS)
    if not account_id or not deployment_id or "/" in account_id or "/" in deployment_id:
        return None
    return account_id, deployment_id


class CamelModel(BaseModel):
    """Fireworks JSON: camelCase on the wire, snake_case in Python, unknown fields kept."""

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)


# --- GET /v1/accounts ----------------------------------------------------------------


class Account(CamelModel):
    """The account the API key belongs to; the SDK reads `name` (`accounts/{id}`)."""

    name: str
    display_name: str | None = None
    state: Literal["READY"] = "READY"


class AccountList(CamelModel):
    """`GET /v1/accounts`: the SDK requires exactly one account."""

    accounts: list[Account]
    next_page_token: str = ""
    total_size: int


# --- /v1/accounts/{a}/deployments/{d} ---------------------------------------------


class DeploymentStatus(CamelModel):
    """Detail of the state: why a deployment is not READY, in words."""

    code: StatusCode
    message: str = ""


class ReplicaStats(CamelModel):
    ready_replica_count: int
    initializing_replica_count: int = 0


class Deployment(CamelModel):
    """The deployment resource (what the SDK's `_parse_deployment_info` reads, and counts).

    `base_model` is the model name the server reports; `hot_load_bucket_url` the
    snapshot storage it loads from (None when it was started without one).
    """

    name: str
    display_name: str
    base_model: str
    state: DeploymentState
    status: DeploymentStatus
    create_time: str
    min_replica_count: int
    max_replica_count: int
    replica_count: int
    desired_replica_count: int
    replica_stats: ReplicaStats
    enable_hot_load: bool = True
    hot_load_bucket_url: str | None = None
    hot_load_transition_type: HotLoadTransitionType | None = None
    hot_load_trainer_job: str | None = None
    deployment_shape: str | None = None
    description: str | None = None


class DeploymentCreate(CamelModel):
    """The body of `POST /v1/accounts/{a}/deployments?deploymentId=...` (the SDK's fields)."""

    base_model: str
    description: str | None = None
    min_replica_count: int | None = None
    max_replica_count: int | None = None
    enable_hot_load: bool | None = None
    hot_load_transition_type: str | None = None
    hot_load_trainer_job: str | None = None
    deployment_shape: str | None = None


class DeploymentUpdate(CamelModel):
    """The body of `PATCH /v1/accounts/{a}/deployments/{d}` (`update`, `scale_to_zero`).

    Every field is optional; only the ones sent are compared with the served
    deployment.
    """

    base_model: str | None = None
    min_replica_count: int | None = Field(default=None, ge=0)
    max_replica_count: int | None = Field(default=None, ge=0)
    hot_load_transition_type: str | None = None
    hot_load_trainer_job: str | None = None
    hot_load_bucket_url: str | None = None
    description: str | None = None
    display_name: str | None = None
