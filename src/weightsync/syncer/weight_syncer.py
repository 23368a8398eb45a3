"""`WeightSyncer`: the object a training loop talks to (save, hot-load, warm up).

It keeps the chain state for the user: what this session saved last, whether a
base exists, and which snapshot the deployment last verified (set only after a
successful load). Before sending a delta it asks the deployment what it serves;
a delta only goes out when the deployment serves the delta's parent, otherwise
a full base is saved instead (or, for an explicit delta, the mismatch is logged
before sending).
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from weightsync.errors import (
    DeploymentError,
    HotloadFailedError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidInputError,
    WeightSyncError,
)
from weightsync.syncer.timing import Stopwatch, SyncTiming

if TYPE_CHECKING:
    from weightsync.deployment.manager import DeploymentManager, HotloadResult
    from weightsync.deployment.sampler import DeploymentSampler
    from weightsync.trainer import TrainingClient

logger = logging.getLogger(__name__)

CheckpointType = Literal["base", "delta"]
_CHECKPOINT_TYPES = ("base", "delta")
#: Failures of `save_only` that return None (the trainer keeps training).
_SAVE_FAILURES = (WeightSyncError, OSError, RuntimeError, ValueError)


def _default_codec() -> str:
    from weightsync.codec import DEFAULT_CODEC

    return DEFAULT_CODEC


@dataclass
class WeightSyncer:
    """Saves sampler checkpoints and syncs them to a deployment (see docs/api.md).

    Weight sync is enabled only when both `deploy_mgr` and `deployment_id` are set;
    otherwise every method only saves.
    """

    policy_client: TrainingClient
    deploy_mgr: DeploymentManager | None = None
    deployment_id: str | None = None
    base_model: str = ""
    hotload_timeout: int = 600
    first_checkpoint_type: str = "base"
    compression_format: str = field(default_factory=_default_codec)
    warmup_after_hotload: bool = True
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True
    lora_rank: int = 0
    _: KW_ONLY
    #: On a refused or failed delta inside `save_and_hotload`, save and load a fresh
    #: base once (logged at ERROR). On by default: the deployment kept serving its old
    #: weights, and a verified base restores sync without stopping training.
    recover_with_base: bool = True
    #: Save a full base every N saves (None: only when needed). 20-30 is common practice.
    full_snapshot_interval: int | None = None
    warmup_prompt: str = "Hello"
    warmup_retry_interval_s: float = 1.0
    hotload_poll_interval_s: float = 0.25
    #: How long the first hot-load waits for the deployment's hot-load manager.
    hotload_ready_timeout_s: float = 300.0

    last_timing: SyncTiming | None = field(default=None, init=False)
    _last_saved: str | None = field(default=None, init=False, repr=False)
    _saved_any: bool = field(default=False, init=False, repr=False)
    _has_base: bool = field(default=False, init=False, repr=False)
    _saves_since_base: int = field(default=0, init=False, repr=False)
    _force_base_next: bool = field(default=False, init=False, repr=False)
    _deployed: str | None = field(default=None, init=False, repr=False)
    _ready_checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.first_checkpoint_type not in _CHECKPOINT_TYPES:
            raise InvalidInputError(
                "first_checkpoint_type must be 'base' or 'delta', "
                f"got {self.first_checkpoint_type!r}"
            )
        if self.hotload_timeout <= 0:
            raise InvalidInputError(f"hotload_timeout must be > 0 s, got {self.hotload_timeout}")
        if self.warmup_max_retries < 0 or self.lora_rank < 0:
            raise InvalidInputError("warmup_max_retries and lora_rank must be >= 0")
        if self.full_snapshot_interval is not None and self.full_snapshot_interval < 1:
            raise InvalidInputError(
                f"full_snapshot_interval must be >= 1 or None, got {self.full_snapshot_interval}"
            )
        from weightsync.codec import get_codec

        get_codec(self.compression_format)  # unknown names fail here, listing the known ones
        client_format = getattr(self.policy_client, "compression_format", None)
        if client_format is not None and client_format != self.compression_format:
            logger.warning(
                "WeightSyncer: compression_format %r differs from the training client's %r; "
                "the client is set to %r",
                self.compression_format,
                client_format,
                self.compression_format,
            )
            self.policy_client.compression_format = self.compression_format
        client_rank = getattr(self.policy_client, "lora_rank", None)
        if isinstance(client_rank, int) and client_rank != self.lora_rank:
            logger.warning(
                "WeightSyncer: lora_rank=%d but the training client has lora_rank=%d",
                self.lora_rank,
                client_rank,
            )
        if (self.deploy_mgr is None) != (self.deployment_id is None):
            logger.warning(
                "WeightSyncer: weight sync is disabled: it needs both deploy_mgr and deployment_id"
            )

    # --- state ---------------------------------------------------------------------

    @property
    def weight_sync_enabled(self) -> bool:
        return self.deploy_mgr is not None and self.deployment_id is not None

    @property
    def deployed_snapshot(self) -> str | None:
        """The snapshot the deployment last verified for this syncer (None before any)."""
        return self._deployed

    @property
    def last_saved_snapshot(self) -> str | None:
        return self._last_saved

    @property
    def has_base(self) -> bool:
        return self._has_base

    @property
    def session_id(self) -> str | None:
        value = getattr(self.policy_client, "session_id", None)
        return str(value) if value is not None else None

    def reset_delta_chain(self) -> None:
        """Make the next save a full base (e.g. after the deployment's storage changed)."""
        logger.info("WeightSyncer: delta chain reset; the next save is a base")
        self._force_base_next = True
        client_reset = getattr(self.policy_client, "reset_delta_chain", None)
        if callable(client_reset):
            client_reset()  # the client frees the previous snapshot's bits too

    # --- public API ----------------------------------------------------------------

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights, hot-load them, wait, warm up; return the snapshot name.

        Raises (`HotloadRefusedError`, `HotloadFailedError`, `HotloadTimeoutError`,
        `DeploymentError`) with the expected identity, what the deployment reports and
        what to do. Without weight sync it only saves.
        """
        watch = Stopwatch()
        timing = SyncTiming()
        self.last_timing = timing
        try:
            return self._save_and_hotload(name, checkpoint_type, watch, timing)
        finally:
            self._finish(timing, watch)

    def _save_and_hotload(
        self, name: str, checkpoint_type: str | None, watch: Stopwatch, timing: SyncTiming
    ) -> str:
        serving: str | None = None
        if self.weight_sync_enabled:
            self._ensure_ready()
            serving = self.check_deployment_state()
        kind = self._resolve_type(checkpoint_type, serving=serving, check_serving=True)
        with watch.phase("save"):
            result = self._save(name, kind, timing)
        identity = str(result.snapshot_name)
        if not self.weight_sync_enabled:
            return identity
        try:
            self._load(identity, watch, timing)
        except (HotloadRefusedError, HotloadFailedError) as e:
            if not self._can_recover(identity):
                raise self._explain(e, identity) from e
            return self._recover(name, e, watch, timing)
        except WeightSyncError as e:
            raise self._explain(e, identity) from e
        return identity

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights without syncing; the snapshot name, or None (logged) on failure."""
        watch = Stopwatch()
        timing = SyncTiming()
        self.last_timing = timing
        try:
            kind = self._resolve_type(checkpoint_type, serving=None, check_serving=False)
            with watch.phase("save"):
                result = self._save(name, kind, timing)
        except _SAVE_FAILURES as e:
            logger.warning("save_only(%r) failed: %s: %s", name, type(e).__name__, e)
            self._finish(timing, watch)
            return None
        self._finish(timing, watch)
        return str(result.snapshot_name)

    def hotload(self, snapshot_name: str, checkpoint_type: str | None = None) -> bool:
        """Hot-load a saved snapshot, wait and warm up; True on success, False (logged) else."""
        watch = Stopwatch()
        timing = SyncTiming(snapshot_name=snapshot_name, checkpoint_type=checkpoint_type)
        self.last_timing = timing
        if not self.weight_sync_enabled:
            logger.warning(
                "hotload(%r): weight sync is disabled (needs deploy_mgr and deployment_id)",
                snapshot_name,
            )
            return False
        try:
            self._ensure_ready()
            self.check_deployment_state()
            self._load(snapshot_name, watch, timing, expected_type=checkpoint_type)
        except WeightSyncError as e:
            logger.error("hotload(%r) failed: %s", snapshot_name, self._explain(e, snapshot_name))
            self._finish(timing, watch)
            return False
        self._finish(timing, watch)
        return True

    def check_deployment_state(self) -> str | None:
        """The snapshot identity the deployment serves (None if none or replicas disagree)."""
        mgr, deployment_id = self._require_sync()
        status = mgr.hotload_check_status(deployment_id, self.base_model)
        replicas = status.get("replicas") or []
        identities = {r.get("current_snapshot_identity") for r in replicas}
        for replica in replicas:
            state = replica.get("loading_state") or {}
            logger.info(
                "deployment %s replica %s: serving %r, readiness=%s, stage=%s",
                deployment_id,
                replica.get("replica_id"),
                replica.get("current_snapshot_identity"),
                replica.get("readiness"),
                state.get("stage"),
            )
        if len(identities) != 1:
            if replicas:
                logger.warning(
                    "deployment %s: replicas serve different snapshots %s; the next load is a base",
                    deployment_id,
                    sorted(str(i) for i in identities),
                )
            return None
        current = identities.pop()
        return str(current) if current else None

    def wait_for_hotload_ready(self, timeout_s: float = 300, poll_interval_s: float = 5) -> None:
        """Block until the deployment's hot-load manager answers with its replicas."""
        import time

        mgr, deployment_id = self._require_sync()
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                status = mgr.hotload_check_status(deployment_id, self.base_model)
                replicas = status.get("replicas") or []
                stages = [(r.get("loading_state") or {}).get("stage") for r in replicas]
                if replicas and not any(s in ("initializing", "starting") for s in stages):
                    self._ready_checked = True
                    return
                last = f"{len(replicas)} replica(s), stages {stages}"
            except InvalidInputError:
                raise
            except WeightSyncError as e:
                last = str(e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HotloadTimeoutError(
                    f"the hot-load manager of deployment {deployment_id!r} was not ready within "
                    f"{timeout_s:g}s (last: {last}). Check that the deployment is running "
                    "(DeploymentManager.get / `weightsync deploy status URL`) and its URL is right."
                )
            time.sleep(min(poll_interval_s, remaining))

    def get_deployment_sampler(self, tokenizer: Any = None) -> DeploymentSampler:
        """A `DeploymentSampler` for this syncer's deployment.

        With `lora_rank > 0` it samples from the adapter loaded last; get a new one
        after each sync.
        """
        from weightsync.deployment.sampler import DeploymentSampler

        mgr, deployment_id = self._require_sync()
        headers = {**mgr.additional_headers, **mgr.headers_for(deployment_id)}
        model = self.base_model or deployment_id
        if self.lora_rank > 0 and self._deployed is not None:
            model = self._deployed  # the deployment serves the adapter under its identity
        return DeploymentSampler(
            mgr.inference_url_for(deployment_id),
            model=model,
            api_key=mgr.api_key,
            tokenizer=tokenizer,
            additional_headers=headers,
        )

    def get_sampling_client(
        self, name: str | None = None, *, tokenizer: Any = None
    ) -> DeploymentSampler:
        """A sampler of the deployment; with `name`, sync the current weights first."""
        if name is not None:
            self.save_and_hotload(name)
        return self.get_deployment_sampler(tokenizer=tokenizer)

    # --- internals -----------------------------------------------------------------

    def _require_sync(self) -> tuple[DeploymentManager, str]:
        if self.deploy_mgr is None or self.deployment_id is None:
            raise InvalidInputError(
                "weight sync is disabled: construct WeightSyncer with deploy_mgr= "
                "and deployment_id="
            )
        return self.deploy_mgr, self.deployment_id

    def _ensure_ready(self) -> None:
        if not self._ready_checked:
            self.wait_for_hotload_ready(
                timeout_s=self.hotload_ready_timeout_s,
                poll_interval_s=min(5.0, max(0.1, self.hotload_ready_timeout_s / 20)),
            )

    def _resolve_type(
        self, requested: str | None, *, serving: str | None, check_serving: bool
    ) -> CheckpointType:
        if requested is not None and requested not in _CHECKPOINT_TYPES:
            raise InvalidInputError(
                f"checkpoint_type must be 'base', 'delta' or None, got {requested!r}"
            )
        if self.lora_rank > 0:
            if requested == "delta":
                logger.warning("lora_rank > 0: LoRA adapters are standalone; saving a base")
            return "base"
        if requested is not None:
            kind: CheckpointType = "delta" if requested == "delta" else "base"
            if kind == "delta" and check_serving and not self._serves_parent(serving):
                logger.warning(
                    "an explicit delta was asked for, but deployment %s serves %r, not %r "
                    "(the delta's parent); it will likely be refused",
                    self.deployment_id,
                    serving,
                    self._last_saved,
                )
            return kind
        if self._force_base_next or not self._saved_any:
            kind = "base" if self._force_base_next else self._first_type()
        elif (
            self.full_snapshot_interval is not None
            and self._saves_since_base + 1 >= self.full_snapshot_interval
        ):
            kind = "base"
        else:
            kind = "delta"
        if kind == "delta" and check_serving and not self._serves_parent(serving):
            logger.warning(
                "deployment %s serves %r, not %r which the next delta would apply onto; "
                "saving a full base instead",
                self.deployment_id,
                serving,
                self._last_saved,
            )
            kind = "base"
        return kind

    def _first_type(self) -> CheckpointType:
        return "delta" if self.first_checkpoint_type == "delta" else "base"

    def _serves_parent(self, serving: str | None) -> bool:
        """Whether a delta saved now would apply onto what the deployment serves."""
        if serving is None:
            return False
        if hasattr(self.policy_client, "last_snapshot"):
            parent = self.policy_client.last_snapshot  # the client's own chain head
            return parent is not None and serving == parent
        if self._last_saved is not None:
            return serving == self._last_saved
        session = self.session_id
        return session is not None and serving.endswith(f"-{session}")

    def _save(self, name: str, kind: CheckpointType, timing: SyncTiming) -> Any:
        result = self.policy_client.save_weights_for_sampler_ext(name, checkpoint_type=kind)
        saved_type = str(getattr(result, "checkpoint_type", kind))
        self._last_saved = str(result.snapshot_name)
        self._saved_any = True
        if saved_type == "delta":
            self._saves_since_base += 1
        else:
            self._has_base = True
            self._saves_since_base = 0
            self._force_base_next = False
        timing.snapshot_name = self._last_saved
        timing.checkpoint_type = saved_type
        timing.payload_bytes = int(getattr(result, "payload_bytes", 0) or 0)
        timing.full_bytes = int(getattr(result, "full_bytes", 0) or 0)
        logger.info(
            "saved %s snapshot %s (%d bytes)", saved_type, self._last_saved, timing.payload_bytes
        )
        return result

    def _incremental_metadata(
        self, identity: str, expected_type: str | None
    ) -> dict[str, Any] | None:
        manifest = self.policy_client.store.read_manifest(identity)
        if expected_type is not None and manifest.kind not in (expected_type, "lora"):
            logger.warning(
                "snapshot %s is a %s (its manifest says so), not a %s; loading it as a %s",
                identity,
                manifest.kind,
                expected_type,
                manifest.kind,
            )
        if manifest.kind != "delta":
            return None
        return {
            "previous_snapshot_identity": manifest.parent,
            "compression_format": manifest.compression_format,
            "checksum_format": manifest.checksum_format,
        }

    def _load(
        self,
        identity: str,
        watch: Stopwatch,
        timing: SyncTiming,
        *,
        expected_type: str | None = None,
    ) -> HotloadResult:
        mgr, deployment_id = self._require_sync()
        metadata = self._incremental_metadata(identity, expected_type)
        if metadata is not None:
            parent = metadata["previous_snapshot_identity"]
            serving = self._deployed
            if serving is None or serving != parent:
                serving = self.check_deployment_state()
            if serving != parent:
                logger.warning(
                    "delta %s applies onto %r, but deployment %s serves %r: it will be refused",
                    identity,
                    parent,
                    deployment_id,
                    serving,
                )
        try:
            with watch.phase("hotload"):
                result = mgr.hotload_and_wait(
                    deployment_id,
                    self.base_model,
                    identity,
                    metadata,
                    timeout_seconds=self.hotload_timeout,
                    reset_prompt_cache=self.reset_prompt_cache,
                    poll_interval=self.hotload_poll_interval_s,
                )
        except WeightSyncError:
            self._deployed = None  # unknown until asked again
            if metadata is not None:
                self._force_base_next = True  # the chain head is not what it serves
            raise
        self._deployed = identity
        timing.pause_s = result.pause_s
        logger.info("deployment %s serves %s (verified)", deployment_id, identity)
        if self.warmup_after_hotload and self.warmup_max_retries > 0:
            with watch.phase("warmup"):
                # A LoRA adapter is addressed by its identity; warm up that, not the base.
                model = identity if self.lora_rank > 0 else self.base_model or deployment_id
                timing.warmed_up = mgr.warmup(
                    model,
                    max_retries=self.warmup_max_retries,
                    retry_interval_s=self.warmup_retry_interval_s,
                    deployment_id=deployment_id,
                    prompt=self.warmup_prompt,
                )
            if not timing.warmed_up:
                logger.warning(
                    "warmup after loading %s did not answer HTTP 200 in %d tries; the snapshot "
                    "is loaded and verified, the first requests may be slow",
                    identity,
                    self.warmup_max_retries,
                )
        return result

    def _can_recover(self, identity: str) -> bool:
        return (
            self.recover_with_base
            and self.lora_rank == 0
            and self.last_timing is not None
            and self.last_timing.checkpoint_type == "delta"
            and self._last_saved == identity
        )

    def _recover(
        self, name: str, error: WeightSyncError, watch: Stopwatch, timing: SyncTiming
    ) -> str:
        logger.error(
            "delta %s was not loaded (%s); recovering: saving and loading a full base %r "
            "(recover_with_base=True)",
            timing.snapshot_name,
            error,
            f"{name}-base",
        )
        with watch.phase("save"):
            result = self._save(f"{name}-base", "base", timing)
        identity = str(result.snapshot_name)
        try:
            self._load(identity, watch, timing)
        except WeightSyncError as e:
            raise self._explain(e, identity, note=f"recovery after: {error}") from e
        timing.recovered = True
        return identity

    def _explain(self, error: WeightSyncError, identity: str, *, note: str = "") -> WeightSyncError:
        """The same kind of error, with the identity, what the deployment reports, what to do."""
        from weightsync.deployment.manager import describe_status

        reported = "unavailable"
        if self.deploy_mgr is not None:
            try:
                reported = describe_status(
                    self.deploy_mgr.hotload_check_status(self.deployment_id, self.base_model)
                )
            except WeightSyncError as e:
                reported = f"unavailable ({e})"
        if isinstance(error, HotloadRefusedError):
            todo = (
                "the deployment keeps serving its snapshot; call reset_delta_chain() (or keep "
                "recover_with_base=True) so the next save is a full base"
            )
            cls: type[WeightSyncError] = HotloadRefusedError
        elif isinstance(error, HotloadFailedError):
            todo = (
                "the deployment keeps serving its previous snapshot; verify the snapshot "
                "(`weightsync snapshot verify`), check storage, then reset_delta_chain() "
                "and save again"
            )
            cls = HotloadFailedError
        elif isinstance(error, TimeoutError):
            todo = (
                f"raise hotload_timeout (now {self.hotload_timeout}s) or check the deployment's log"
            )
            cls = HotloadTimeoutError
        else:
            todo = "check that the deployment is running and reachable, then retry"
            cls = DeploymentError if isinstance(error, DeploymentError) else type(error)
        message = (
            f"deployment {self.deployment_id!r} did not load {identity!r}: {error}. "
            f"Deployment reports: {reported}. What to do: {todo}."
        )
        if note:
            message += f" ({note})"
        try:
            return cls(message)
        except TypeError:
            return DeploymentError(message)

    def _finish(self, timing: SyncTiming, watch: Stopwatch) -> None:
        timing.save_s = watch.seconds.get("save", 0.0)
        timing.hotload_s = watch.seconds.get("hotload", 0.0)
        timing.warmup_s = watch.seconds.get("warmup", 0.0)
        timing.total_s = watch.elapsed_s()
