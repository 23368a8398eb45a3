"""`DeploymentManager`: the HTTP client of a deployment, and the lifecycle of local ones.

A deployment is addressed by its `deployment_id`. For a local deployment
(spawned by `create_or_get`) the address comes from the registry; otherwise
from the URLs given to the manager. Explicit URLs win: `hotload_api_url` for
the hot-load API, `inference_url` for completions, `base_url` for both when
the others are unset.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import httpx
from pydantic import ValidationError

from weightsync.deployment.http import DeploymentHTTP, RetryPolicy, auth_headers
from weightsync.deployment.local import (
    DeploymentConfig,
    DeploymentInfo,
    LocalRegistry,
    process_alive,
    spawn,
    stop,
)
from weightsync.errors import (
    DeploymentError,
    DeploymentHTTPError,
    HotloadFailedError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidInputError,
    UnsupportedOperationError,
    WeightSyncError,
)
from weightsync.identity import validate_identity
from weightsync.sdk_defaults import HOTLOAD_WAIT_TIMEOUT_S
from weightsync.wire import (
    HOT_LOAD_WAIT_PARAM,
    MAX_HOT_LOAD_WAIT_S,
    AccountList,
    HotLoadRequest,
    HotLoadStatus,
    IncrementalSnapshotMetadata,
    LedgerAnswers,
    ReplicaStatus,
    ScaleAnswer,
    ScaleRequest,
    WeightsAnswers,
    WireModel,
    cache_reset_policy,
    parse_deployment_name,
)
from weightsync.wire.paths import (
    ACCOUNTS_PATH,
    COMPLETIONS_PATH,
    HOT_LOAD_PATH,
    LEDGER_PATH,
    LEDGER_RESET_PATH,
    SCALE_PATH,
    WEIGHTS_PATH,
)

logger = logging.getLogger(__name__)

ResetPromptCache = bool | Literal["all", "none", "new_session"]
_Answer = TypeVar("_Answer", bound=WireModel)
HotloadOutcome = Literal["ready", "error", "pending"]
#: First wait between hot-load status polls (it doubles up to the poll interval).
FIRST_POLL_S = 0.005


@dataclass(frozen=True, kw_only=True)
class HotloadResult:
    """A finished hot-load: the identity every replica serves and what they reported."""

    identity: str
    seconds: float
    status: dict[str, Any]
    #: Longest serving pause any replica reported for this load (None if not reported).
    pause_s: float | None = None


def parse_status(status: HotLoadStatus | Mapping[str, Any]) -> HotLoadStatus:
    """`status` as the wire's `HotLoadStatus` (parsed once, here); a malformed one is named."""
    if isinstance(status, HotLoadStatus):
        return status
    try:
        return HotLoadStatus.model_validate(status)
    except ValidationError as e:
        raise DeploymentError(
            f"the deployment's hot-load status is not the wire contract's "
            f"({e.error_count()} problem(s): {e.errors()[0]['msg']} at "
            f"{'.'.join(str(x) for x in e.errors()[0]['loc'])}): {str(dict(status))[:500]}"
        ) from e


def _serves(replica: ReplicaStatus, identity: str) -> bool:
    return replica.readiness and (
        replica.current_snapshot_identity == identity or identity in replica.adapter_identities()
    )


def counted_replicas(status: HotLoadStatus) -> list[ReplicaStatus]:
    """The replicas "every replica" means: all of a fixed pool; the admitted ones of an
    elastic deployment (those catching up or missing are listed, but not waited for)."""
    return [r for r in status.replicas if r.membership in (None, "admitted")]


def hotload_outcome(
    status: HotLoadStatus | Mapping[str, Any], identity: str
) -> tuple[HotloadOutcome, str]:
    """Classify a hot-load status for `identity`: ready on every replica, failed, or pending.

    Errors whose target is another identity are stale (an earlier load) and ignored.
    """
    replicas = counted_replicas(parse_status(status))
    if not replicas:
        return "pending", "the deployment reports no replicas yet"
    errors = [
        f"{_replica_name(r)}: {r.loading_state.error or 'error'}"
        for r in replicas
        if r.loading_state.stage == "error" and r.loading_state.target_snapshot_identity == identity
    ]
    if errors:
        return "error", "; ".join(errors)
    pending = [r for r in replicas if not _serves(r, identity)]
    if pending:
        return "pending", describe_status(HotLoadStatus(replicas=pending))
    return "ready", ""


def deployment_id_of_model(model: str) -> str:
    """`accounts/{a}/deployments/{d}` (the SDK's name of a deployment) -> `d`; else `model`."""
    parsed = parse_deployment_name(model)
    return model if parsed is None else parsed[1]


def _parse(model: type[_Answer], body: Any, url: str, *, method: str = "GET") -> _Answer:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise DeploymentError(
            f"{method} {url}: the answer is not the wire contract's {model.__name__} "
            f"({e.errors()[0]['msg']}): {str(body)[:500]}"
        ) from e


def _is_identity(name: str) -> bool:
    try:
        validate_identity(name, what="deployment id")
    except InvalidInputError:
        return False
    return True


def _replica_name(replica: ReplicaStatus) -> str:
    rid = replica.replica_id
    return rid if rid.startswith("replica") else f"replica {rid}"


def describe_status(status: HotLoadStatus | Mapping[str, Any]) -> str:
    """One line per replica: what it serves, whether it is ready, what it is doing."""
    lines = []
    for replica in parse_status(status).replicas:
        state = replica.loading_state
        line = (
            f"{_replica_name(replica)}: serving {replica.current_snapshot_identity!r}, "
            f"readiness={replica.readiness}, stage={state.stage!r}"
        )
        if state.target_snapshot_identity:
            line += f" (target {state.target_snapshot_identity!r})"
        if state.error:
            line += f", error: {state.error}"
        lines.append(line)
    return "; ".join(lines) or "no replicas reported"


def reported_pause_s(status: HotLoadStatus | Mapping[str, Any], identity: str) -> float | None:
    """The longest serving pause the replicas report for their last load of `identity`."""
    pauses = [
        r.last_load.pause_s
        for r in parse_status(status).replicas
        if r.last_load is not None and r.last_load.identity == identity
    ]
    return max(pauses) if pauses else None


class DeploymentManager:
    """HTTP client of deployments (hot-load, status, ledger, warmup) and local lifecycle."""

    def __init__(  # noqa: PLR0917  (positional order of the reference API)
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        inference_url: str | None = None,
        hotload_api_url: str | None = None,
        additional_headers: dict[str, str] | None = None,
        verify_ssl: bool | None = None,
        *,
        registry_dir: str | os.PathLike[str] | None = None,
        request_timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        stop_on_exit: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`transport` carries the calls to deployments (hot-load, status, ledger, warmup:
        httpx's seam, for tests); the manager's one pooled client is closed by `close()`."""
        self.api_key = api_key
        self.base_url = base_url.rstrip("/") if base_url else None
        self._inference_url = inference_url.rstrip("/") if inference_url else None
        self._hotload_api_url = hotload_api_url.rstrip("/") if hotload_api_url else None
        self.additional_headers = dict(additional_headers or {})
        self.registry = LocalRegistry(registry_dir)
        self.stop_on_exit = stop_on_exit
        self._http = DeploymentHTTP(
            headers=auth_headers(api_key, self.additional_headers),
            verify_ssl=True if verify_ssl is None else verify_ssl,
            timeout_s=request_timeout_s,
            retry=retry,
            transport=transport,
        )
        # API keys of deployments this manager spawned, when the manager has none itself.
        self._deployment_keys: dict[str, str] = {}
        self._spawned: set[str] = set()
        self._lock = threading.Lock()
        self._account_id: str | None = None
        #: Why the last hot-load wait returned False (None after a success).
        self.last_hotload_error: HotloadFailedError | HotloadTimeoutError | None = None
        #: What the replicas reported for the last successful hot-load wait.
        self.last_hotload_result: HotloadResult | None = None
        if stop_on_exit:
            atexit.register(self._stop_spawned)

    # --- addresses -----------------------------------------------------------

    def _local_url(self, deployment_id: str | None) -> str | None:
        if deployment_id is None:
            return None
        info = self.registry.read(deployment_id)
        if info is None:
            return None
        if info.state != "running" or not info.url:
            raise DeploymentError(
                f"local deployment {deployment_id!r} is not running (state {info.state}); "
                "start it with DeploymentManager.create_or_get(config)"
            )
        return info.url

    @property
    def inference_url(self) -> str | None:
        """The inference URL given, else `base_url` (the SDK's attribute; None: local only)."""
        return self._inference_url or self.base_url

    @property
    def hotload_api_url(self) -> str | None:
        """The hot-load URL given, else `base_url` (the SDK's attribute; None: local only)."""
        return self._hotload_api_url or self.base_url

    def hotload_url(self, deployment_id: str | None) -> str:
        """Root URL of the hot-load API of `deployment_id`."""
        url = self._hotload_api_url or self._local_url(deployment_id) or self.base_url
        if url is None:
            raise InvalidInputError(
                f"no address for deployment {deployment_id!r}: it is not a local deployment "
                "of this registry, and the manager has no hotload_api_url or base_url"
            )
        return url

    def inference_url_for(self, deployment_id: str | None) -> str:
        """Root URL of the OpenAI-compatible inference API of `deployment_id`."""
        url = self._inference_url or self._local_url(deployment_id) or self.base_url
        if url is None:
            raise InvalidInputError(
                f"no inference address for deployment {deployment_id!r}: it is not a local "
                "deployment of this registry, and the manager has no inference_url or base_url"
            )
        return url

    @property
    def account_id(self) -> str:
        """The account the deployment's control plane reports for the API key (`GET /v1/accounts`).

        Resolved once, from `base_url` (else `hotload_api_url`), as the Fireworks SDK does;
        the SDK's `WeightSyncer` names the deployment `accounts/{account_id}/deployments/{id}`.
        """
        if self._account_id is None:
            self._account_id = self._resolve_account_id()
        return self._account_id

    def _resolve_account_id(self) -> str:
        root = self.base_url or self._hotload_api_url
        if root is None:
            raise InvalidInputError(
                "account_id needs the deployment's address: construct the DeploymentManager "
                "with base_url= (a `weightsync serve` URL answers GET /v1/accounts)"
            )
        url = f"{root}{ACCOUNTS_PATH}?pageSize=2"
        headers = {"X-Api-Key": self.api_key} if self.api_key else {}
        body = self._http.get_json(url, headers=headers)
        try:
            accounts = AccountList.model_validate(body).accounts
        except ValidationError as e:
            raise DeploymentError(
                f"GET {url}: not an account list ({str(body)[:500]}); check the URL "
                "(a `weightsync serve` deployment)"
            ) from e
        account = accounts[0].name.removeprefix("accounts/") if len(accounts) == 1 else ""
        if not account:
            raise DeploymentError(
                f"GET {url}: expected exactly one named account for this API key, got "
                f"{[a.name for a in accounts]}; check the API key"
            )
        return account

    def headers_for(self, deployment_id: str | None) -> dict[str, str]:
        """Request headers (auth) for `deployment_id` beyond the manager's own."""
        if self.api_key is None and deployment_id in self._deployment_keys:
            return auth_headers(self._deployment_keys[deployment_id])
        return {}

    # --- local lifecycle -------------------------------------------------------

    def create_or_get(
        self, config: DeploymentConfig, force_recreate: bool = False
    ) -> DeploymentInfo:
        """Return the running local deployment `config.deployment_id`, starting it if needed.

        `force_recreate=True` stops a running one first (its state directory is kept
        unless it was the default one, as `delete` does).
        """
        if not isinstance(config, DeploymentConfig):
            raise InvalidInputError(
                f"create_or_get takes weightsync.deployment.DeploymentConfig (storage=, "
                f"snapshot= or model_dir=), got {type(config).__module__}."
                f"{type(config).__qualname__}: weightsync starts local deployments itself; a "
                "running `weightsync serve` is addressed by URL (DeploymentManager(base_url=...)) "
                "and needs no creating"
            )
        with self._lock:
            if config.api_key:
                self._deployment_keys[config.deployment_id] = config.api_key
            info = self.registry.read(config.deployment_id)
            if info is not None and info.state == "running" and force_recreate:
                logger.info("deployment %s: force_recreate, stopping it", config.deployment_id)
                stop(info)
            elif info is not None and info.state == "running":
                logger.info("deployment %s: already running at %s", config.deployment_id, info.url)
                return info
            info = spawn(config, self.registry)
            self._spawned.add(config.deployment_id)
            return info

    def get(self, deployment_id: str) -> DeploymentInfo | None:
        """The registry's record of a local deployment (state refreshed), or None."""
        return self.registry.read(deployment_id)

    def list_deployments(self) -> list[DeploymentInfo]:
        infos = (self.registry.read(d) for d in self.registry.list_ids())
        return [info for info in infos if info is not None]

    def wait_for_ready(
        self, deployment_id: str, timeout_s: float = 600.0, poll_interval_s: float = 1.0
    ) -> DeploymentInfo:
        """Block until every replica reports readiness; return the deployment's record.

        A deployment addressed by URL (not in the registry) gets a record naming its
        hot-load URL; `hotload_check_status` has what the replicas report.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                status = parse_status(self.hotload_check_status(deployment_id))
                counted = counted_replicas(status)
                if counted and all(r.readiness for r in counted):
                    return self._record_of(deployment_id)
                last = describe_status(status)
            except DeploymentError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise HotloadTimeoutError(
                    f"deployment {deployment_id!r} was not ready within {timeout_s:g}s; "
                    f"last seen: {last}"
                )
            time.sleep(poll_interval_s)

    def _record_of(self, deployment_id: str) -> DeploymentInfo:
        info = self.registry.read(deployment_id) if _is_identity(deployment_id) else None
        if info is not None:
            return info
        return DeploymentInfo(
            deployment_id=deployment_id, url=self.hotload_url(deployment_id), pid=None,
            state="running",
        )  # fmt: skip

    def scale_to_zero(self, deployment_id: str) -> bool:
        """Stop a local deployment's processes but keep its record and state (ledger).

        `create_or_get` with the same id starts it again. Returns True if it was running.
        """
        info = self._require_local(deployment_id)
        stopped = stop(info)
        info.state = "stopped"
        info.pid = None
        info.url = None
        self.registry.write(info)
        self._spawned.discard(deployment_id)
        return stopped

    def delete(self, deployment_id: str) -> bool:
        """Stop a local deployment and forget it (record and default state dir removed)."""
        import shutil

        info = self.registry.read(deployment_id)
        if info is None:
            return False
        stop(info)
        self._spawned.discard(deployment_id)
        self._deployment_keys.pop(deployment_id, None)
        shutil.rmtree(self.registry.deployment_dir(deployment_id), ignore_errors=True)
        return True

    def _require_local(self, deployment_id: str) -> DeploymentInfo:
        info = self.registry.read(deployment_id)
        if info is None:
            raise DeploymentError(
                f"no local deployment {deployment_id!r} in {self.registry.root}; "
                "create it with DeploymentManager.create_or_get(DeploymentConfig(...))"
            )
        return info

    def _stop_spawned(self) -> None:
        for deployment_id in sorted(self._spawned):
            info = self.registry.read(deployment_id)
            if info is not None and process_alive(info):
                logger.info("stopping deployment %s at exit", deployment_id)
                self.scale_to_zero(deployment_id)

    def close(self) -> None:
        """Close connections (spawned deployments keep running until scaled down or exit)."""
        self._http.close()

    # --- hot-load API ----------------------------------------------------------

    @property
    def last_hotload_error_message(self) -> str | None:
        """Why the last `hotload_and_wait` / `wait_for_hotload` returned False (the SDK's name)."""
        return None if self.last_hotload_error is None else str(self.last_hotload_error)

    def hotload(  # noqa: PLR0917  (the SDK's positional order)
        self,
        deployment_id: str | None,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: dict[str, Any] | None = None,
        reset_prompt_cache: ResetPromptCache = True,
        timeout: float = 60,
        path: str | None = None,
        cmek_resource: str | None = None,
    ) -> dict[str, Any]:
        """Ask the deployment to load `snapshot_identity`; return its acceptance.

        `base_model` names the served model in logs. A refusal (4xx other than auth)
        raises `HotloadRefusedError` with the server's reason. `path` and
        `cmek_resource` (the SDK's source-URL and decryption headers) are not supported:
        a weightsync deployment reads snapshots from the storage it was started with.
        """
        validate_identity(snapshot_identity)
        if path is not None or cmek_resource is not None:
            raise UnsupportedOperationError(
                f"hot-load of {snapshot_identity!r}: path= / cmek_resource= are not supported; "
                "a weightsync deployment loads snapshots from the storage it was started with "
                "(`weightsync serve --storage`). Pass path=None and cmek_resource=None"
            )
        try:
            request = HotLoadRequest(
                identity=snapshot_identity,
                incremental_snapshot_metadata=None
                if incremental_snapshot_metadata is None
                else IncrementalSnapshotMetadata.model_validate(incremental_snapshot_metadata),
                reset_prompt_cache=cache_reset_policy(reset_prompt_cache),
            )
        except ValidationError as e:
            raise InvalidInputError(
                f"hot-load of {snapshot_identity!r}: incremental_snapshot_metadata "
                f"{incremental_snapshot_metadata!r} is not valid ({e.errors()[0]['msg']}); "
                "it needs previous_snapshot_identity, and may carry compression_format "
                "and checksum_format"
            ) from e
        body = request.model_dump(exclude_none=True)
        url = self.hotload_url(deployment_id) + HOT_LOAD_PATH
        meta = request.incremental_snapshot_metadata
        logger.info(
            "hot-load %s on %s (%s): %s",
            snapshot_identity,
            deployment_id or url,
            base_model or "model",
            "base" if meta is None else f"delta of {meta.previous_snapshot_identity}",
        )
        try:
            result = self._http.post_json(
                url, body, headers=self.headers_for(deployment_id), timeout_s=timeout
            )
        except DeploymentHTTPError as e:
            if 400 <= e.status_code < 500 and e.status_code not in (401, 403):
                raise HotloadRefusedError(
                    f"deployment {deployment_id or url} refused snapshot {snapshot_identity!r} "
                    f"(HTTP {e.status_code}): {e.message}"
                ) from e
            raise
        return result if isinstance(result, dict) else {"result": result}

    def hotload_check_status(
        self,
        deployment_id: str | None,
        base_model: str = "",
        timeout: float = 30,
        *,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        """The deployment's hot-load status (`{"replicas": [...]}`, DESIGN.md).

        `wait_s` (at most `MAX_HOT_LOAD_WAIT_S`) long-polls: a weightsync deployment answers
        as soon as no load runs, or after `wait_s`; a server without the long-poll answers at
        once (it ignores the parameter).
        """
        url = self.hotload_url(deployment_id) + HOT_LOAD_PATH
        if wait_s > 0:
            url += f"?{HOT_LOAD_WAIT_PARAM}={min(wait_s, MAX_HOT_LOAD_WAIT_S):.3f}"
        status = self._http.get_json(
            url, headers=self.headers_for(deployment_id), timeout_s=timeout + wait_s
        )
        if not isinstance(status, dict):
            raise DeploymentError(f"GET {url}: expected a JSON object, got {status!r}")
        return status

    def wait_for_hotload(
        self,
        deployment_id: str | None,
        base_model: str,
        expected_identity: str,
        timeout_seconds: float = HOTLOAD_WAIT_TIMEOUT_S,
        poll_interval: float = 0.5,
    ) -> bool:
        """Wait until every replica is ready on `expected_identity`; True then, else False.

        False (the SDK's contract) when a replica reports `stage: "error"` for this
        identity or after `timeout_seconds`; `last_hotload_error` then holds a
        `HotloadFailedError` / `HotloadTimeoutError` naming the identity and the last
        status, and `last_hotload_error_message` its text. On True, `last_hotload_result`
        holds what the replicas reported (time, longest serving pause).

        Each status GET long-polls (`wait_s`): a weightsync deployment answers the moment
        its loads end, so the wait adds no polling delay to the sync's time-to-serve. A
        server that answers at once instead (no long-poll: the Fireworks service, an older
        weightsync) is polled fast at first (every 5 ms, doubling up to `poll_interval`).
        """
        start = time.monotonic()
        self.last_hotload_error = None
        self.last_hotload_result = None
        delay = min(FIRST_POLL_S, poll_interval)
        while True:
            asked = time.monotonic()
            wait_s = min(MAX_HOT_LOAD_WAIT_S, max(0.0, timeout_seconds - (asked - start)))
            status = self.hotload_check_status(deployment_id, base_model, wait_s=wait_s)
            outcome, detail = hotload_outcome(status, expected_identity)
            if outcome == "ready":
                self.last_hotload_result = HotloadResult(
                    identity=expected_identity,
                    seconds=time.monotonic() - start,
                    status=status,
                    pause_s=reported_pause_s(status, expected_identity),
                )
                return True
            if outcome == "error":
                self.last_hotload_error = HotloadFailedError(
                    f"deployment {deployment_id} failed to load {expected_identity!r}: {detail}. "
                    "It keeps serving what it had; check the snapshot "
                    "(`weightsync snapshot verify`) and the deployment's ledger."
                )
                logger.warning("%s", self.last_hotload_error)
                return False
            elapsed = time.monotonic() - start
            if elapsed >= timeout_seconds:
                self.last_hotload_error = HotloadTimeoutError(
                    f"deployment {deployment_id} did not finish loading {expected_identity!r} "
                    f"within {timeout_seconds:g}s; it reports: {detail}. Raise the timeout "
                    "for large models, or check the deployment's logs."
                )
                logger.warning("%s", self.last_hotload_error)
                return False
            # A long-poll that ran its wait asks again at once; an answer that came sooner
            # than `delay` (a server that does not wait) is paced by the backoff.
            answered_in_s = time.monotonic() - asked
            time.sleep(max(0.0, min(delay - answered_in_s, timeout_seconds - elapsed)))
            delay = min(delay * 2, poll_interval)

    def hotload_and_wait(  # noqa: PLR0917  (the SDK's positional order)
        self,
        deployment_id: str | None,
        base_model: str,
        snapshot_identity: str,
        incremental_snapshot_metadata: dict[str, Any] | None = None,
        reset_prompt_cache: ResetPromptCache = True,
        timeout_seconds: float = HOTLOAD_WAIT_TIMEOUT_S,
        path: str | None = None,
        cmek_resource: str | None = None,
        *,
        poll_interval: float = 0.5,
    ) -> bool:
        """`hotload` then `wait_for_hotload`: True when every replica serves the snapshot.

        A refusal raises `HotloadRefusedError` (the SDK raises its HTTP error); a failed
        or timed-out load returns False with `last_hotload_error` set.
        """
        start = time.monotonic()
        self.hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            incremental_snapshot_metadata,
            reset_prompt_cache,
            path=path,
            cmek_resource=cmek_resource,
        )
        done = self.wait_for_hotload(
            deployment_id,
            base_model,
            snapshot_identity,
            timeout_seconds=timeout_seconds,
            poll_interval=poll_interval,
        )
        if done and self.last_hotload_result is not None:
            self.last_hotload_result = replace(
                self.last_hotload_result, seconds=time.monotonic() - start
            )
        return done

    def weights_checksums(
        self, deployment_id: str | None, *, checksum_format: str | None = None
    ) -> dict[str, dict[str, str]]:
        """Per replica, the checksum of every live weight tensor, computed by the replica now.

        Compare with `checksum_tensor(fmt, t)` of `TrainingClient.exported_weights()` to
        prove bit for bit what the deployment serves.
        """
        url = self.hotload_url(deployment_id) + WEIGHTS_PATH
        if checksum_format is not None:
            url += f"?checksum_format={checksum_format}"
        body = self._http.get_json(url, headers=self.headers_for(deployment_id))
        answers = _parse(WeightsAnswers, body, url)
        return {replica.replica_id: dict(replica.checksums) for replica in answers.replicas}

    # --- scaling (a deployment on Ray) ------------------------------------------

    def scale(
        self, deployment_id: str | None, replicas: int, *, timeout_s: float = 600.0
    ) -> ScaleAnswer:
        """Run `replicas` replicas of a deployment on Ray (`weightsync serve --ray`).

        Added replicas join at the head (the answer's `membership` lists them catching up
        until they serve it); removed ones are drained first, and the answer comes once they
        stopped: `cancelled` has, per removed replica, the requests its drain cut (None: it
        was missing or did not answer). `timeout_s` bounds the call (the drains included).
        A deployment that is not on Ray has no scale route: `UnsupportedOperationError`.
        """
        try:
            body = ScaleRequest(replicas=replicas).model_dump()
        except ValidationError as e:
            raise InvalidInputError(
                f"scale of deployment {deployment_id!r}: replicas must be in 0..10000, "
                f"got {replicas!r}"
            ) from e
        url = self.hotload_url(deployment_id) + SCALE_PATH
        try:
            answer = self._http.post_json(
                url, body, headers=self.headers_for(deployment_id), timeout_s=timeout_s
            )
        except DeploymentHTTPError as e:
            if e.status_code in (404, 405):
                raise UnsupportedOperationError(
                    f"deployment {deployment_id or url} cannot be scaled: POST {url} answered "
                    f"HTTP {e.status_code} ({e.message}). Only a deployment on Ray (`weightsync "
                    "serve --ray`, DeploymentConfig(ray_address=...)) has the scale route; a "
                    "local deployment runs the replicas it was started with: recreate it with "
                    "DeploymentConfig(replicas=N) and create_or_get(config, force_recreate=True)"
                ) from e
            raise
        return _parse(ScaleAnswer, answer, url, method="POST")

    # --- ledger and warmup -------------------------------------------------------

    def ledger(self, deployment_id: str | None) -> list[dict[str, Any]]:
        """Every load the deployment recorded (per replica, oldest first), flattened."""
        url = self.hotload_url(deployment_id) + LEDGER_PATH
        body = self._http.get_json(url, headers=self.headers_for(deployment_id))
        answers = _parse(LedgerAnswers, body, url)
        # One list per replica: flatten, each entry naming its replica.
        return [
            {"replica_id": replica.replica_id, **entry.model_dump()}
            for replica in answers.replicas
            for entry in replica.entries
        ]

    def reset_ledger(self, deployment_id: str | None) -> dict[str, Any]:
        """Clear the deployment's ledger; afterwards it accepts only a base."""
        url = self.hotload_url(deployment_id) + LEDGER_RESET_PATH
        result = self._http.post_json(url, {}, headers=self.headers_for(deployment_id))
        return result if isinstance(result, dict) else {"result": result}

    def warmup(
        self,
        model: str,
        max_retries: int = 10,
        retry_interval_s: float = 1.0,
        *,
        deployment_id: str | None = None,
        prompt: str = "Hello",
        timeout_s: float = 60.0,
    ) -> bool:
        """Send a one-token completion until it answers HTTP 200; True if it did.

        The deployment is `deployment_id` if given, else a local deployment named
        `model`, else the manager's inference URL. Never raises for a failed warmup.
        """
        target = deployment_id
        named = deployment_id_of_model(model)
        if (
            target is None
            and self._inference_url is None
            and _is_identity(named)
            and self.registry.read(named)
        ):
            target = named
        try:
            url = self.inference_url_for(target) + COMPLETIONS_PATH
        except WeightSyncError as e:
            logger.warning("warmup of %s skipped: %s", model, e)
            return False
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        for attempt in range(1, max_retries + 1):
            try:
                self._http.request(
                    "POST",
                    url,
                    json=body,
                    headers=self.headers_for(target),
                    timeout_s=timeout_s,
                    max_retries=0,
                )
            except WeightSyncError as e:
                logger.info("warmup %d/%d of %s: %s", attempt, max_retries, url, e)
                if attempt < max_retries:
                    time.sleep(retry_interval_s)
                continue
            logger.debug("warmup of %s answered after %d attempt(s)", url, attempt)
            return True
        logger.warning("warmup of %s did not answer HTTP 200 after %d tries", url, max_retries)
        return False
