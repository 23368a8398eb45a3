"""The deployment managers a `WeightSyncer` drives: weightsync's, or the Fireworks SDK's.

A syncer is given either `weightsync.DeploymentManager` or any manager with the
Fireworks SDK's names (`HotloadManager`, e.g. `fireworks.training.sdk.DeploymentManager`):
the drop-in promise is that a loop written for the SDK runs unchanged with either.
The two differ in what they return and raise, so `link_manager` wraps the manager once
in a `ManagerLink`, the only interface the syncer calls:

- `OwnManagerLink` (weightsync's manager): its typed errors are raised as they are, its
  poll interval and warmup prompt are passed, the replicas' reported pause is read;
- `SdkManagerLink` (the SDK's names only, the SDK's keywords only): its httpx errors and
  its False answers become weightsync's errors, its model names are
  `accounts/{account}/deployments/{id}`, as the SDK's own syncer sends them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from weightsync.deployment.manager import DeploymentManager
from weightsync.errors import (
    DeploymentError,
    HotloadFailedError,
    HotloadRefusedError,
    HotloadTimeoutError,
    WeightSyncError,
)

if TYPE_CHECKING:
    from weightsync.deployment.sampler import DeploymentSampler

logger = logging.getLogger(__name__)

#: What asking a deployment manager can raise: ours raises WeightSyncError, the SDK's
#: httpx errors (HTTP status, connection) and RuntimeError; a malformed answer ValueError.
MANAGER_ERRORS = (WeightSyncError, httpx.HTTPError, OSError, RuntimeError, ValueError)


class HotloadManager(Protocol):
    """What `WeightSyncer` uses of a deployment manager: the Fireworks SDK's names.

    Both `weightsync.DeploymentManager` and `fireworks.training.sdk.DeploymentManager` fit.
    """

    @property
    def api_key(self) -> str | None: ...

    @property
    def account_id(self) -> str: ...

    @property
    def inference_url(self) -> str | None: ...

    @property
    def last_hotload_error_message(self) -> str | None: ...

    def hotload_and_wait(  # noqa: PLR0917  (the SDK's positional order)
        self,
        deployment_id: str,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: dict[str, Any] | None = ...,
        reset_prompt_cache: bool = ...,
        timeout_seconds: int = ...,
        path: str | None = ...,
    ) -> bool: ...

    def hotload_check_status(self, deployment_id: str, base_model: str) -> dict[str, Any]: ...

    def warmup(self, model: str, max_retries: int = ..., retry_interval_s: float = ...) -> bool: ...


class ManagerLink(ABC):
    """One deployment manager as the syncer calls it; `link_manager` picks the subclass."""

    def __init__(self, mgr: HotloadManager) -> None:
        self.mgr = mgr

    def status(self, deployment_id: str, base_model: str) -> dict[str, Any]:
        """The hot-load status as the manager returns it (its own errors, unchanged)."""
        return self.mgr.hotload_check_status(deployment_id, base_model)

    @abstractmethod
    def hotload_and_wait(
        self,
        deployment_id: str,
        identity: str,
        metadata: dict[str, Any] | None,
        *,
        base_model: str,
        reset_prompt_cache: bool,
        timeout_s: int,
        poll_interval_s: float,
    ) -> float | None:
        """Load `identity` and wait until every replica serves it; the pause reported, if any.

        Raises a `WeightSyncError` (refused, failed, timed out, unreachable) naming it.
        """

    @abstractmethod
    def warmup(
        self,
        deployment_id: str,
        *,
        model: str,
        max_retries: int,
        retry_interval_s: float,
        prompt: str,
    ) -> bool:
        """Send completions until one answers HTTP 200; never raises (the SDK's rule)."""

    @abstractmethod
    def sampler(self, deployment_id: str, *, model: str, tokenizer: Any) -> DeploymentSampler:
        """A `DeploymentSampler` of the deployment, addressing `model` (see each subclass)."""


class OwnManagerLink(ManagerLink):
    """weightsync's `DeploymentManager`: its typed errors, poll interval and replica report."""

    mgr: DeploymentManager

    def __init__(self, mgr: DeploymentManager) -> None:
        super().__init__(mgr)

    def hotload_and_wait(
        self,
        deployment_id: str,
        identity: str,
        metadata: dict[str, Any] | None,
        *,
        base_model: str,
        reset_prompt_cache: bool,
        timeout_s: int,
        poll_interval_s: float,
    ) -> float | None:
        loaded = self.mgr.hotload_and_wait(
            deployment_id,
            base_model,
            identity,
            metadata,
            reset_prompt_cache=reset_prompt_cache,
            timeout_seconds=timeout_s,
            poll_interval=poll_interval_s,
        )
        if not loaded:  # the manager keeps why: its typed error, raised as it is
            raise self.mgr.last_hotload_error or HotloadFailedError(
                f"deployment {deployment_id!r} did not load {identity!r}"
            )
        result = self.mgr.last_hotload_result
        return None if result is None else result.pause_s

    def warmup(
        self,
        deployment_id: str,
        *,
        model: str,
        max_retries: int,
        retry_interval_s: float,
        prompt: str,
    ) -> bool:
        return self.mgr.warmup(
            model,
            max_retries=max_retries,
            retry_interval_s=retry_interval_s,
            deployment_id=deployment_id,
            prompt=prompt,
        )

    def sampler(self, deployment_id: str, *, model: str, tokenizer: Any) -> DeploymentSampler:
        """Addresses `model` with the manager's headers for the deployment."""
        from weightsync.deployment.sampler import DeploymentSampler

        return DeploymentSampler(
            self.mgr.inference_url_for(deployment_id),
            model=model,
            api_key=self.mgr.api_key,
            tokenizer=tokenizer,
            additional_headers={
                **self.mgr.additional_headers,
                **self.mgr.headers_for(deployment_id),
            },
        )


class SdkManagerLink(ManagerLink):
    """A manager with the SDK's names, called with the SDK's keywords only."""

    def sdk_model(self, deployment_id: str) -> str:
        """The model name the SDK sends to a deployment: `accounts/{account}/deployments/{id}`."""
        return f"accounts/{self.mgr.account_id}/deployments/{deployment_id}"

    def hotload_and_wait(
        self,
        deployment_id: str,
        identity: str,
        metadata: dict[str, Any] | None,
        *,
        base_model: str,
        reset_prompt_cache: bool,
        timeout_s: int,
        poll_interval_s: float,
    ) -> float | None:
        """The SDK polls at its own interval; `poll_interval_s` is not its keyword."""
        try:
            loaded = self.mgr.hotload_and_wait(
                deployment_id=deployment_id,
                base_model=base_model,
                snapshot_identity=identity,
                incremental_snapshot_metadata=metadata,
                reset_prompt_cache=reset_prompt_cache,
                timeout_seconds=timeout_s,
                path=None,
            )
        except httpx.HTTPStatusError as e:  # the SDK's manager raises these on a refusal
            code = e.response.status_code
            reason = f"HTTP {code}: {e.response.text[:2000]}"
            if 400 <= code < 500 and code not in (401, 403):
                raise HotloadRefusedError(
                    f"deployment {deployment_id!r} refused snapshot {identity!r} ({reason})"
                ) from e
            raise DeploymentError(
                f"hot-load of {identity!r} on deployment {deployment_id!r} failed ({reason})"
            ) from e
        except httpx.HTTPError as e:
            raise DeploymentError(
                f"hot-load of {identity!r} on deployment {deployment_id!r} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not loaded:  # the SDK keeps only a message; its wording tells a timeout apart
            detail = self.mgr.last_hotload_error_message or "no detail reported"
            if "did not complete within" in detail:
                raise HotloadTimeoutError(detail)
            raise HotloadFailedError(detail)
        return None  # the SDK's manager reports no pause

    def warmup(
        self,
        deployment_id: str,
        *,
        model: str,
        max_retries: int,
        retry_interval_s: float,
        prompt: str,
    ) -> bool:
        """Warms up the SDK's model name, as the SDK's syncer does (its own prompt)."""
        try:
            return bool(
                self.mgr.warmup(
                    self.sdk_model(deployment_id),
                    max_retries=max_retries,
                    retry_interval_s=retry_interval_s,
                )
            )
        except MANAGER_ERRORS as e:  # warmup is never fatal (the SDK's rule too)
            logger.warning("warmup of deployment %s failed: %s", deployment_id, e)
            return False

    def sampler(self, deployment_id: str, *, model: str, tokenizer: Any) -> DeploymentSampler:
        """Addresses the SDK's model name at the manager's inference URL (`model` unused)."""
        from weightsync.deployment.sampler import DeploymentSampler

        return DeploymentSampler(
            self.mgr.inference_url or "",
            model=self.sdk_model(deployment_id),
            api_key=self.mgr.api_key,
            tokenizer=tokenizer,
        )


def link_manager(mgr: HotloadManager) -> ManagerLink:
    """The link for `mgr`: weightsync's own manager, or any other with the SDK's names."""
    if isinstance(mgr, DeploymentManager):
        return OwnManagerLink(mgr)
    return SdkManagerLink(mgr)
