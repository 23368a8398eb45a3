"""`WeightSyncer`: the object a training loop talks to (save, hot-load, warm up).

It keeps the reference's contract (the Fireworks SDK's `WeightSyncer`): the
first save is a base, later ones deltas; the deployment is asked once, before
the first hot-load, whether its manager is ready and what it serves (a
snapshot of another session makes the first save a base); `save_and_hotload`
returns the snapshot name or raises. `base_identity` (the snapshot the
deployment last verified) is set only after a successful load; after a
snapshot that did not load, the next automatic save is a base, since a delta
on top of it could not apply.

Beyond the reference, opt-in: `recover_with_base` (a refused delta is replaced
by a fresh base inside the same call) and `check_deployment_before_save`
(ask the deployment before every save; a delta whose parent it does not serve
is saved as a base instead). The deployment manager may be weightsync's or the
SDK's own (`syncer/managers.py` links either); the policy client is weightsync's
`TrainingClient`, whose chain head and manifests the syncer reads.

Under a sharded trainer (a `TrainingClient` under `torch.distributed`) every rank
constructs the same syncer and makes the same calls; only rank 0 is given
`deploy_mgr` and `deployment_id`. Each save takes rank 0's checkpoint type (it alone
knows what the deployment serves), so the ranks always save the same snapshot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from weightsync.errors import (
    HotloadFailedError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidInputError,
    WeightSyncError,
)
from weightsync.sdk_defaults import (
    DEFAULT_COMPRESSION_FORMAT,
    CheckpointType,
    normalize_checkpoint_type,
)
from weightsync.syncer.managers import MANAGER_ERRORS, HotloadManager, ManagerLink, link_manager
from weightsync.syncer.timing import Stopwatch, SyncTiming

if TYPE_CHECKING:
    from weightsync.deployment.sampler import DeploymentSampler
    from weightsync.trainer import SaveSamplerResult, TrainingClient
    from weightsync.trainer.distributed import ShardedSaver

logger = logging.getLogger(__name__)

#: Failures of `save_only` that return None (the trainer keeps training).
_SAVE_FAILURES = (WeightSyncError, OSError, RuntimeError, ValueError)
#: The longest one warmup request may take (the managers' own per-request limit).
_WARMUP_REQUEST_S = 60.0


@dataclass
class WeightSyncer:
    """Saves sampler checkpoints and syncs them to a deployment (see docs/api.md).

    Weight sync is enabled only when both `deploy_mgr` and `deployment_id` are set;
    otherwise every method only saves.
    """

    policy_client: TrainingClient
    deploy_mgr: HotloadManager | None = None
    deployment_id: str | None = None
    base_model: str = ""
    hotload_timeout: int = 600
    first_checkpoint_type: str = "base"
    compression_format: str = DEFAULT_COMPRESSION_FORMAT
    warmup_after_hotload: bool = True
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True
    lora_rank: int = 0
    _: KW_ONLY
    #: Opt-in: on a refused or failed delta inside `save_and_hotload`, save and load a
    #: fresh base once (logged at ERROR) and return *its* name instead of raising.
    recover_with_base: bool = False
    #: Opt-in: ask the deployment what it serves before every save; a delta whose parent
    #: it does not serve is saved as a base (one status GET per save).
    check_deployment_before_save: bool = False
    #: Save a full base every N saves (None: only when needed). 20-30 is common practice.
    full_snapshot_interval: int | None = None
    warmup_prompt: str = "Hello"
    warmup_retry_interval_s: float = 1.0
    #: Longest wait between status polls of weightsync's manager (it starts at 5 ms).
    hotload_poll_interval_s: float = 0.25
    #: How long the first hot-load waits for the deployment's hot-load manager.
    hotload_ready_timeout_s: float = 300.0

    #: The SDK's timing dict of the last call (see `SyncTiming` for the keys).
    last_timing: SyncTiming = field(default_factory=SyncTiming, init=False)
    #: The SDK's chain state: a snapshot was saved; the snapshot the deployment verified.
    base_saved: bool = field(default=False, init=False)
    base_identity: str | None = field(default=None, init=False)
    _last_saved: str | None = field(default=None, init=False, repr=False)
    _has_base: bool = field(default=False, init=False, repr=False)
    _saves_since_base: int = field(default=0, init=False, repr=False)
    _force_base_next: bool = field(default=False, init=False, repr=False)
    _deployment_checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        first = normalize_checkpoint_type(self.first_checkpoint_type, what="first_checkpoint_type")
        if first not in ("base", "delta"):
            raise InvalidInputError(
                "first_checkpoint_type must be 'base' or 'delta', "
                f"got {self.first_checkpoint_type!r}"
            )
        self.first_checkpoint_type = first
        if self.hotload_timeout <= 0:
            raise InvalidInputError(f"hotload_timeout must be > 0 s, got {self.hotload_timeout}")
        if self.warmup_max_retries < 0 or self.lora_rank < 0:
            raise InvalidInputError("warmup_max_retries and lora_rank must be >= 0")
        if self.full_snapshot_interval is not None and self.full_snapshot_interval < 1:
            raise InvalidInputError(
                f"full_snapshot_interval must be >= 1 or None, got {self.full_snapshot_interval}"
            )
        from weightsync.codec import get_codec
        from weightsync.trainer import TrainingClient

        if not isinstance(self.policy_client, TrainingClient):
            raise InvalidInputError(
                f"WeightSyncer(policy_client=...) needs a weightsync TrainingClient, got "
                f"{type(self.policy_client).__name__}: the syncer reads the client's chain "
                "head and snapshot manifests. Wrap the model: "
                "TrainingClient(model, storage=...)"
            )
        canonical = get_codec(self.compression_format).name  # unknown names list the known ones
        client_format = self.policy_client.compression_format
        if client_format != canonical:
            raise InvalidInputError(
                f"WeightSyncer(compression_format={self.compression_format!r}) but its training "
                f"client writes deltas with {client_format!r}: the hot-load metadata would name "
                "another codec than the snapshots. Give both the same compression_format, e.g. "
                f"TrainingClient(..., compression_format={self.compression_format!r})"
            )
        client_rank = self.policy_client.lora_rank
        if client_rank != self.lora_rank:
            logger.warning(
                "WeightSyncer: lora_rank=%d but the training client has lora_rank=%d",
                self.lora_rank,
                client_rank,
            )
        if self.recover_with_base and self._sharded_saver() is not None:
            raise InvalidInputError(
                "recover_with_base=True is not supported under a sharded trainer: the recovery "
                "base would be saved by rank 0 alone, while a save needs every rank. Leave it "
                "off: after a refused delta the next save_and_hotload saves a base on every rank"
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
        return self.base_identity

    @property
    def last_saved_snapshot(self) -> str | None:
        return self._last_saved

    @property
    def has_base(self) -> bool:
        return self._has_base

    @property
    def session_id(self) -> str:
        return self.policy_client.session_id

    def reset_delta_chain(self) -> None:
        """Make the next save a full base (e.g. after the deployment's storage changed)."""
        logger.info(
            "WeightSyncer: delta chain reset (was base_saved=%s, base_identity=%s); "
            "the next save is a base",
            self.base_saved,
            self.base_identity,
        )
        self._force_base_next = True
        self.base_identity = None
        self.policy_client.reset_delta_chain()  # the client frees the previous bits too

    # --- public API ----------------------------------------------------------------

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights, hot-load them, wait, warm up; return the snapshot name.

        Raises (`HotloadRefusedError`, `HotloadFailedError`, `HotloadTimeoutError`,
        `DeploymentError`) with the expected identity, what the deployment reports and
        what to do; with `recover_with_base=True` a refused delta is replaced by a base
        whose name is returned. Without weight sync it only saves.
        """
        watch = Stopwatch()
        timing = SyncTiming()
        self.last_timing = timing
        try:
            return self._save_and_hotload(name, checkpoint_type, watch, timing)
        finally:
            timing.record_phases(watch)

    def _save_and_hotload(
        self, name: str, checkpoint_type: str | None, watch: Stopwatch, timing: SyncTiming
    ) -> str:
        serving: str | None = None
        if self.weight_sync_enabled:
            self._ensure_deployment_checked()
            if self.check_deployment_before_save:
                serving = self.check_deployment_state()
        kind = self._resolve_type(
            checkpoint_type, serving=serving, check_serving=self.check_deployment_before_save
        )
        kind = self._rank0_type(kind, name)
        with watch.phase("save"):
            result = self._save(name, kind, timing)
        identity = str(result.snapshot_name)
        if not self.weight_sync_enabled:
            return identity
        try:
            self._load(identity, watch, timing)
        except (HotloadRefusedError, HotloadFailedError) as e:
            if not self._can_recover(identity, timing):
                self._add_context(e, identity)
                raise
            return self._recover(name, e, watch, timing)
        except WeightSyncError as e:
            self._add_context(e, identity)
            raise
        return identity

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights without syncing; the snapshot name, or None (logged) on failure."""
        watch = Stopwatch()
        timing = SyncTiming()
        self.last_timing = timing
        try:
            kind = self._resolve_type(checkpoint_type, serving=None, check_serving=False)
            kind = self._rank0_type(kind, name)
            with watch.phase("save"):
                result = self._save(name, kind, timing)
        except _SAVE_FAILURES as e:
            logger.warning("save_only(%r) failed: %s: %s", name, type(e).__name__, e)
            return None
        finally:
            timing.record_phases(watch)
        return str(result.snapshot_name)

    def hotload(self, snapshot_name: str, checkpoint_type: str | None = None) -> bool:
        """Hot-load a saved snapshot, wait and warm up; True on success, False (logged) else."""
        watch = Stopwatch()
        timing = SyncTiming(
            snapshot_name=snapshot_name, checkpoint_type=normalize_checkpoint_type(checkpoint_type)
        )
        self.last_timing = timing
        if not self.weight_sync_enabled:
            logger.warning(
                "hotload(%r): weight sync is disabled (needs deploy_mgr and deployment_id)",
                snapshot_name,
            )
            return False
        try:
            self._ensure_deployment_checked()
            self._load(snapshot_name, watch, timing, expected_type=checkpoint_type)
        except WeightSyncError as e:
            self._add_context(e, snapshot_name)
            logger.error("hotload(%r) failed: %s", snapshot_name, e)
            return False
        finally:
            timing.record_phases(watch)
        return True

    def check_deployment_state(self) -> str | None:
        """The snapshot identity the deployment serves.

        None when weight sync is disabled, the deployment serves nothing, its replicas
        disagree, or it cannot be asked (logged as a warning, as the SDK does).
        """
        from weightsync.deployment.manager import parse_status

        if self.deploy_mgr is None or self.deployment_id is None:
            return None
        try:
            replicas = parse_status(
                self.deploy_mgr.hotload_check_status(self.deployment_id, self.base_model)
            ).replicas
        except MANAGER_ERRORS as e:
            logger.warning("could not check deployment %s: %s", self.deployment_id, e)
            return None
        identities = {r.current_snapshot_identity for r in replicas}
        for replica in replicas:
            logger.info(
                "deployment %s replica %s: serving %r, readiness=%s, stage=%s",
                self.deployment_id,
                replica.replica_id,
                replica.current_snapshot_identity,
                replica.readiness,
                replica.loading_state.stage,
            )
        if len(identities) != 1:
            if replicas:
                logger.warning(
                    "deployment %s: replicas serve different snapshots %s",
                    self.deployment_id,
                    sorted(str(i) for i in identities),
                )
            else:
                logger.info("deployment %s: no replicas (it may be scaling up)", self.deployment_id)
            return None
        current = identities.pop()
        return str(current) if current else None

    def wait_for_hotload_ready(self, timeout_s: float = 300, poll_interval_s: float = 5) -> None:
        """Block until the deployment's hot-load manager answers with its replicas.

        Returns at once when weight sync is disabled; raises `HotloadTimeoutError`
        (a `TimeoutError`) after `timeout_s`.
        """
        from weightsync.deployment.manager import parse_status

        if self.deploy_mgr is None or self.deployment_id is None:
            return
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                status = self.deploy_mgr.hotload_check_status(self.deployment_id, self.base_model)
                if parse_status(status).replicas:  # the SDK's test: it lists its replicas
                    return
                last = "no replicas yet (the deployment may be scaling up)"
            except InvalidInputError:
                raise
            except MANAGER_ERRORS as e:  # not answering yet: keep polling
                last = str(e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HotloadTimeoutError(
                    f"the hot-load manager of deployment {self.deployment_id!r} was not ready "
                    f"within {timeout_s:g}s (last: {last}). Check that the deployment is running "
                    "(DeploymentManager.get / `weightsync deploy status URL`) and its URL is right."
                )
            time.sleep(min(poll_interval_s, remaining))

    def get_deployment_sampler(self, tokenizer: Any = None) -> DeploymentSampler:
        """A `DeploymentSampler` for this syncer's deployment.

        With `lora_rank > 0` it samples from the adapter loaded last; get a new one
        after each sync.
        """
        link, deployment_id = self._require_sync()
        model = self.base_model or deployment_id
        if self.lora_rank > 0 and self.base_identity is not None:
            model = self.base_identity  # the deployment serves the adapter under its identity
        return link.sampler(deployment_id, model=model, tokenizer=tokenizer)

    def get_sampling_client(
        self, tokenizer: Any = None, *, name: str | None = None
    ) -> DeploymentSampler:
        """A sampler of the deployment; with `name`, sync the current weights first."""
        if name is not None:
            self.save_and_hotload(name)
        return self.get_deployment_sampler(tokenizer=tokenizer)

    # --- internals -----------------------------------------------------------------

    def _require_sync(self) -> tuple[ManagerLink, str]:
        if self.deploy_mgr is None or self.deployment_id is None:
            raise InvalidInputError(
                "weight sync is disabled: construct WeightSyncer with deploy_mgr= "
                "and deployment_id="
            )
        return link_manager(self.deploy_mgr), self.deployment_id

    def _ensure_deployment_checked(self) -> None:
        """Once, before the first hot-load: wait for the hot-load manager, see what it serves.

        A deployment serving a snapshot that is not this client's chain head (another
        session's, or nothing) makes the next automatic save a base.
        """
        if self._deployment_checked:
            return
        self.wait_for_hotload_ready(
            timeout_s=self.hotload_ready_timeout_s,
            poll_interval_s=min(5.0, max(0.1, self.hotload_ready_timeout_s / 20)),
        )
        self._deployment_checked = True
        current = self.check_deployment_state()
        head = self.policy_client.last_snapshot
        if current is None or current != head:
            if current is not None:
                logger.info(
                    "deployment %s serves %r from another chain; the first hot-load is a base",
                    self.deployment_id,
                    current,
                )
            self.base_identity = None
        else:
            self.base_identity = current

    def _resolve_type(
        self, requested: str | None, *, serving: str | None, check_serving: bool
    ) -> CheckpointType:
        explicit = normalize_checkpoint_type(requested)
        if self.lora_rank > 0:
            if explicit == "merged_base":
                return explicit
            if explicit == "delta":
                logger.warning("lora_rank > 0: LoRA adapters are standalone; saving a base")
            return "base"
        if explicit is not None:
            if explicit == "delta" and check_serving and not self._serves_parent(serving):
                logger.warning(
                    "an explicit delta was asked for, but deployment %s serves %r, not %r "
                    "(the delta's parent); it will likely be refused",
                    self.deployment_id,
                    serving,
                    self._chain_head(),
                )
            return explicit
        kind: CheckpointType
        if self._force_base_next or not self.base_saved:
            kind = "base" if self._force_base_next else self._first_type()
        elif (
            self.full_snapshot_interval is not None
            and self._saves_since_base + 1 >= self.full_snapshot_interval
        ):
            kind = "base"
        else:
            kind = "delta"
        if kind == "delta" and self._chain_head() is None:
            kind = "base"  # the client holds no snapshot a delta could apply onto
        if kind == "delta" and not self.base_saved and self.base_identity != self._chain_head():
            kind = "base"  # a first delta must apply onto what the deployment was seen serving
        if kind == "delta" and check_serving and not self._serves_parent(serving):
            logger.warning(
                "deployment %s serves %r, not %r which the next delta would apply onto; "
                "saving a full base instead",
                self.deployment_id,
                serving,
                self._chain_head(),
            )
            kind = "base"
        return kind

    def _sharded_saver(self) -> ShardedSaver | None:
        return self.policy_client.sharded_saver

    def _rank0_type(self, kind: CheckpointType, name: str) -> CheckpointType:
        """Under a sharded trainer, rank 0's type for this save (see the module docstring)."""
        saver = self._sharded_saver()
        if saver is None:
            return kind
        # Between two saves rank 0 may hot-load (wait for the manager, load, warm up);
        # the other ranks wait for its choice at most that long, then one save barrier.
        wait_s = (
            self.hotload_ready_timeout_s
            + self.hotload_timeout
            + self.warmup_max_retries * (self.warmup_retry_interval_s + _WARMUP_REQUEST_S)
            + saver.barrier_timeout_s
        )
        chosen = saver.rank0_checkpoint_type(kind, name=name, timeout_s=wait_s)
        return normalize_checkpoint_type(chosen) or kind

    def _first_type(self) -> CheckpointType:
        return "delta" if self.first_checkpoint_type == "delta" else "base"

    def _chain_head(self) -> str | None:
        """The snapshot a delta saved now would apply onto."""
        return self.policy_client.last_snapshot

    def _serves_parent(self, serving: str | None) -> bool:
        """Whether a delta saved now would apply onto what the deployment serves."""
        head = self._chain_head()
        return serving is not None and head is not None and serving == head

    def _save(self, name: str, kind: CheckpointType, timing: SyncTiming) -> SaveSamplerResult:
        result = self.policy_client.save_weights_for_sampler_ext(name, checkpoint_type=kind)
        saved_type = result.checkpoint_type
        self._last_saved = result.snapshot_name
        self.base_saved = True
        if saved_type == "delta":
            self._saves_since_base += 1
        else:
            self._has_base = True
            self._saves_since_base = 0
            self._force_base_next = False
        timing.update(
            snapshot_name=self._last_saved,
            checkpoint_type=saved_type,
            payload_bytes=result.payload_bytes,
            full_bytes=result.full_bytes,
        )
        logger.info(
            "saved %s snapshot %s (%d bytes)", saved_type, self._last_saved, timing.payload_bytes
        )
        return result

    def _incremental_metadata(
        self, identity: str, expected_type: str | None
    ) -> dict[str, Any] | None:
        """The hot-load metadata of `identity`, from its manifest (what was really written)."""
        manifest = self.policy_client.store.read_manifest(identity)
        expected = normalize_checkpoint_type(expected_type)
        if expected is not None and manifest.kind not in (expected, "lora"):
            logger.warning(
                "snapshot %s is a %s (its manifest says so), not a %s; loading it as a %s",
                identity,
                manifest.kind,
                expected,
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
    ) -> None:
        link, deployment_id = self._require_sync()
        metadata = self._incremental_metadata(identity, expected_type)
        if metadata is not None and metadata["previous_snapshot_identity"] != self.base_identity:
            logger.warning(
                "delta %s applies onto %r, but deployment %s was last seen serving %r: "
                "it may be refused",
                identity,
                metadata["previous_snapshot_identity"],
                deployment_id,
                self.base_identity,
            )
        try:
            with watch.phase("hotload"):
                pause_s = link.hotload_and_wait(
                    deployment_id,
                    identity,
                    metadata,
                    base_model=self.base_model,
                    reset_prompt_cache=self.reset_prompt_cache,
                    timeout_s=self.hotload_timeout,
                    poll_interval_s=self.hotload_poll_interval_s,
                )
        except WeightSyncError:
            self.base_identity = None  # unknown until asked again
            # The client's chain head is this snapshot, which the deployment does not hold:
            # a delta on top of it could not apply, so the next automatic save is a base.
            self._force_base_next = True
            raise
        self.base_identity = identity
        timing["pause_s"] = pause_s
        logger.info("deployment %s serves %s (verified)", deployment_id, identity)
        if self.warmup_after_hotload and self.warmup_max_retries > 0:
            with watch.phase("warmup"):
                timing["warmed_up"] = link.warmup(
                    deployment_id,
                    # A LoRA adapter is addressed by its identity; warm up that, not the base.
                    model=identity if self.lora_rank > 0 else self.base_model or deployment_id,
                    max_retries=self.warmup_max_retries,
                    retry_interval_s=self.warmup_retry_interval_s,
                    prompt=self.warmup_prompt,
                )
            if not timing.warmed_up:
                logger.warning(
                    "warmup after loading %s did not answer HTTP 200 in %d tries; the snapshot "
                    "is loaded and verified, the first requests may be slow",
                    identity,
                    self.warmup_max_retries,
                )

    def _can_recover(self, identity: str, timing: SyncTiming) -> bool:
        return (
            self.recover_with_base
            and self.lora_rank == 0
            and timing.checkpoint_type == "delta"
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
            self._add_context(e, identity, note=f"recovery after: {error}")
            raise
        timing["recovered"] = True
        return identity

    def _add_context(self, error: WeightSyncError, identity: str, *, note: str = "") -> None:
        """Add to `error`'s message, in place, the identity, what the deployment reports and
        what to do; the error itself (its type, attributes, cause) propagates unchanged."""
        from weightsync.deployment.manager import describe_status

        reported = "unavailable"
        if self.deploy_mgr is not None and self.deployment_id is not None:
            try:
                reported = describe_status(
                    self.deploy_mgr.hotload_check_status(self.deployment_id, self.base_model)
                )
            except MANAGER_ERRORS as e:  # the report says it is unknown
                reported = f"unavailable ({e})"
        if isinstance(error, HotloadRefusedError):
            todo = (
                "the deployment keeps serving its snapshot; the next automatic save is a full "
                "base (or call reset_delta_chain()); recover_with_base=True does that inside "
                "the same call"
            )
        elif isinstance(error, HotloadFailedError):
            todo = (
                "the deployment keeps serving its previous snapshot; verify the snapshot "
                "(`weightsync snapshot verify`), check storage, then reset_delta_chain() "
                "and save again"
            )
        elif isinstance(error, TimeoutError):
            todo = (
                f"raise hotload_timeout (now {self.hotload_timeout}s) or check the deployment's log"
            )
        else:
            todo = "check that the deployment is running and reachable, then retry"
        after = f". Deployment reports: {reported}. What to do: {todo}."
        if note:
            after += f" ({note})"
        error.add_context(
            before=f"deployment {self.deployment_id!r} did not load {identity!r}: ", after=after
        )
