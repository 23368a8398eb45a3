"""One replica: the hot-load state machine around an engine.

    idle ──start──► (startup load) ──► ready
    ready|error ──POST hot_load──► fetching ──► decoding ──► verifying ──► swapping
                                       │            │            │            │
                                       ▼            ▼            ▼            ▼
                                     error ◄──────────────────────────── checking ──► ready

`fetching` reads every payload file and checks its checksum; `decoding` turns
them into patches against the live weights (read only); `verifying` applies
each patch to a scratch copy and checks the manifest's tensor checksum, so a
corrupt snapshot never touches the live weights; `swapping` holds the swap
lock's exclusive side (the serving pause: apply in place + prompt-cache
reset); `checking` re-checksums the live weights against the manifest and
undoes the swap on a mismatch. Any failure leaves `stage: "error"` naming the
target while the replica keeps serving what it had. One load runs at a time:
a POST for another identity while one runs is refused (409).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from weightsync.codec import (
    Patch,
    canonical_checksum_name,
    checksum_tensor,
    get_codec,
    patch_kernels,
)
from weightsync.codec.bits import bits
from weightsync.errors import (
    DeploymentError,
    HotloadRefusedError,
    HotloadTimeoutError,
    InvalidInputError,
    SnapshotCorruptError,
    SwapInProgressError,
    WeightSyncError,
)
from weightsync.identity import validate_identity
from weightsync.server.admission import check_admissible
from weightsync.server.config import ReplicaConfig
from weightsync.server.engines import get_engine
from weightsync.server.engines.base import CacheScope, Engine, StepGuard
from weightsync.server.fetch_policy import RetryingStorage
from weightsync.server.ledger import Ledger, LedgerEntry, utc_now
from weightsync.server.load_report import LOADING_STAGES, LoadReport, Stage
from weightsync.server.metrics import ReplicaMetrics
from weightsync.server.prefetch import PrefetchingStorage, hint_snapshot
from weightsync.server.schemas import (
    CacheResetPolicy,
    HintRequest,
    HotLoadRequest,
    cache_reset_policy,
)
from weightsync.server.sources import (
    has_tokenizer,
    read_model_dir,
    read_start_weights,
)
from weightsync.server.stage_hooks import StageHook
from weightsync.server.swap_lock import SwapLock
from weightsync.server.tokenizer import TextTokenizer, load_tokenizer
from weightsync.snapshot import FetchedSnapshot, Manifest, SnapshotStore
from weightsync.storage import Storage, open_storage

logger = logging.getLogger(__name__)


class Replica:
    """Serves one model and hot-loads snapshots into it (see the module docstring)."""

    def __init__(
        self,
        config: ReplicaConfig,
        *,
        engine: Engine | None = None,
        metrics: ReplicaMetrics | None = None,
        storage: Storage | None = None,
        on_stage: StageHook | None = None,
    ) -> None:
        """`engine`/`storage` default to the ones `config` names (tests inject wrappers).

        `on_stage(stage, identity)` is called from the loader thread as each hot-load
        stage begins (see `stage_hooks`).
        """
        self.config = config
        self.engine = (
            engine if engine is not None else get_engine(config.engine, **config.engine_options)
        )
        self.metrics = metrics if metrics is not None else ReplicaMetrics(CollectorRegistry())
        self.storage: PrefetchingStorage | None = None
        self.store: SnapshotStore | None = None
        if storage is not None or config.storage is not None:
            inner = storage if storage is not None else open_storage(config.storage or "")
            self.storage = PrefetchingStorage(RetryingStorage(inner, config.fetch))
            self.store = SnapshotStore(self.storage)
        self.ledger = Ledger(config.state_dir)
        self.tokenizer: TextTokenizer | None = None
        self.recovered_from_ledger = False
        self._swap_lock = SwapLock()
        self._state = threading.Lock()
        self._current: str | None = None
        self._current_base: str | None = None
        self._model_config: dict[str, Any] = {}
        self._stage: Stage = "idle"
        self._target: str | None = None
        self._error: str | None = None
        self._progress: dict[str, Any] | None = None
        self._degraded: str | None = None
        self._last_load: LoadReport | None = None
        self._loader: threading.Thread | None = None
        self._on_stage = on_stage

    # --- startup ------------------------------------------------------------

    def start(self) -> None:
        """Load the starting weights: the ledger's last verified snapshot, else the start source."""
        last, adapters = (None, []) if self.ledger.requires_base else self.ledger.recovery_plan()
        started = time.perf_counter()
        # Compile the in-place patch kernels now, not inside the first delta's pause.
        patch_kernels.warm_up()
        if last is not None:
            logger.info(
                "recovering %s (%s) from the ledger %s", last.identity, last.kind, self.ledger.path
            )
            weights = read_start_weights(self.store, last.identity, last.source)
            self.recovered_from_ledger = True
            identity, kind, parent, source = last.identity, last.kind, last.parent, last.source
        elif self.config.snapshot is not None:
            identity = self.config.snapshot
            weights = read_start_weights(self.store, identity, self._require_store().storage.url)
            manifest = self._require_store().read_manifest(identity)
            kind, parent, source = manifest.kind, manifest.parent, self._require_store().storage.url
        else:
            model_dir = Path(self.config.model_dir or ".").resolve()
            identity, kind, parent, source = (
                self.config.start_identity,
                "base",
                None,
                str(model_dir),
            )
            weights = read_model_dir(model_dir)
        self.engine.load_base(weights.config, weights.tensors, tokenizer_dir=weights.tokenizer_dir)
        self._model_config = dict(weights.config)
        if weights.tokenizer_dir is not None:
            self.tokenizer = load_tokenizer(weights.tokenizer_dir)
        with self._state:
            self._current = identity
            self._stage = "ready"
            self._target = identity
        total_s = time.perf_counter() - started
        self.ledger.record(
            LedgerEntry(
                identity=identity,
                kind=kind,
                parent=parent,
                source=source,
                result="ok",
                started_at=utc_now(),
                finished_at=utc_now(),
                total_s=total_s,
                recovered=self.recovered_from_ledger,
            )
        )
        for adapter in adapters:
            self._load_adapter_now(adapter.identity)
        self.metrics.ready.set(1)
        logger.info(
            "replica %s serving %s (%s%s) in %.2fs",
            self.config.replica_id,
            identity,
            kind,
            ", recovered from ledger" if self.recovered_from_ledger else "",
            total_s,
        )

    def _load_adapter_now(self, identity: str) -> None:
        store = self._require_store()
        fetched = store.fetch(identity)
        self.engine.load_adapter(identity, store.read_config(identity), fetched.tensors())

    # --- status -------------------------------------------------------------

    @property
    def current_identity(self) -> str | None:
        return self._current

    @property
    def model_config(self) -> dict[str, Any]:
        return self._model_config

    def readiness(self) -> bool:
        """True only while the replica serves, verified, the identity it reports."""
        with self._state:
            return self._readiness_locked()

    def _readiness_locked(self) -> bool:
        return (
            self._current is not None
            and self._degraded is None
            and self._stage not in ("swapping", "checking")
        )

    def status(self) -> dict[str, Any]:
        """This replica's entry in `GET /hot_load/v1/models/hot_load`."""
        with self._state:
            loading_state: dict[str, Any] = {
                "stage": self._stage,
                "target_snapshot_identity": self._target,
            }
            if self._error is not None:
                loading_state["error"] = self._error
            if self._progress is not None:
                loading_state["progress"] = dict(self._progress)
            return {
                "replica_id": self.config.replica_id,
                "current_snapshot_identity": self._current,
                "readiness": self._readiness_locked(),
                "loading_state": loading_state,
                "loaded_adapters": self.engine.loaded_adapters(),
                "last_load": asdict(self._last_load) if self._last_load else None,
                "recovered_from_ledger": self.recovered_from_ledger,
                "requires_base": self.ledger.requires_base,
                "transition": self.config.transition,
                "engine": self.engine.name,
                "degraded": self._degraded,
            }

    # --- hot-load: validation -------------------------------------------------

    def request_hot_load(self, request: HotLoadRequest) -> dict[str, Any]:
        """Validate a hot-load and start it in the background; raise to refuse it.

        Returns `{"status": "accepted"|"loading"|"already_serving", ...}`.
        """
        identity = validate_identity(request.identity)
        policy = cache_reset_policy(request.reset_prompt_cache)
        meta = request.incremental_snapshot_metadata
        if meta is not None:
            validate_identity(meta.previous_snapshot_identity, what="previous_snapshot_identity")
            if meta.compression_format is not None:
                get_codec(meta.compression_format)
            if meta.checksum_format is not None:
                canonical_checksum_name(meta.checksum_format)
        early = self._idempotent_answer(identity)
        if early is not None:
            return early
        store = self._require_store()
        manifest = store.read_manifest(identity)
        check_admissible(
            manifest,
            meta,
            replica_id=self.config.replica_id,
            current=self._current,
            requires_base=self.ledger.requires_base,
            engine=self.engine,
            served_config=self._model_config,
            read_snapshot_config=lambda: store.read_config(manifest.identity),
        )
        with self._state:
            # Re-check under the lock: another POST may have started a load meanwhile.
            early = self._idempotent_answer_locked(identity)
            if early is not None:
                return early
            self._stage, self._target, self._error = "fetching", identity, None
            self._progress = {"total_bytes": sum(f.size_bytes for f in manifest.files.values())}
            self._loader = threading.Thread(
                target=self._run_load,
                args=(manifest, policy),
                name=f"hot-load-{identity}",
                daemon=True,
            )
            self._loader.start()
        logger.info("hot-load of %s (%s) accepted", identity, manifest.kind)
        return self._answer("accepted", identity)

    def _answer(self, status: str, identity: str) -> dict[str, Any]:
        return {"status": status, "replica_id": self.config.replica_id, "identity": identity}

    def _idempotent_answer(self, identity: str) -> dict[str, Any] | None:
        with self._state:
            return self._idempotent_answer_locked(identity)

    def _idempotent_answer_locked(self, identity: str) -> dict[str, Any] | None:
        if self._stage in LOADING_STAGES:
            if self._target == identity:
                return self._answer("loading", identity)
            raise HotloadRefusedError(
                f"replica {self.config.replica_id} is loading {self._target!r}; one load runs "
                f"at a time — retry {identity!r} once GET /hot_load/v1/models/hot_load shows "
                "it finished"
            )
        if identity == self._current or identity in self.engine.loaded_adapters():
            return self._answer("already_serving", identity)
        return None

    def _require_store(self) -> SnapshotStore:
        if self.store is None:
            raise InvalidInputError(
                "this deployment has no snapshot storage; start it with --storage URL to "
                "hot-load snapshots"
            )
        return self.store

    # --- hint -----------------------------------------------------------------

    def hint(self, request: HintRequest) -> dict[str, Any]:
        """Start reading a snapshot's files ahead of its hot-load."""
        store = self._require_store()
        if self.storage is None:  # set together with self.store
            raise InvalidInputError("this replica has no storage to read ahead from")
        identity, queued = hint_snapshot(store, self.storage, request.identity, request.files)
        return {"replica_id": self.config.replica_id, "identity": identity, "queued_files": queued}

    # --- hot-load: the background run ---------------------------------------

    def _set_stage(self, stage: Stage, progress: dict[str, Any] | None = None) -> None:
        with self._state:
            self._stage = stage
            self._progress = progress

    def _reached(self, stage: Stage, identity: str) -> None:
        """Tell the `on_stage` hook (if any) that the load of `identity` began `stage`."""
        if self._on_stage is not None:
            self._on_stage(stage, identity)

    def _fetch(self, store: SnapshotStore, identity: str) -> FetchedSnapshot:
        """`store.fetch(identity)`, failing after the fetch policy's `timeout_s`.

        A read that never returns (a hung connection) cannot be interrupted; its
        thread is left behind and its result discarded, so the load still ends,
        loudly, in `error` while the replica keeps serving.
        """
        self._reached("fetching", identity)
        timeout_s = self.config.fetch.timeout_s
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fetch-{identity}")
        try:
            return pool.submit(store.fetch, identity).result(timeout=timeout_s)
        except FutureTimeoutError as e:
            raise HotloadTimeoutError(
                f"fetching snapshot {identity!r} from {store.storage.url} did not finish within "
                f"{timeout_s:g}s (fetch timeout); replica {self.config.replica_id} keeps serving "
                f"{self._current!r} — check the storage, or raise --fetch-timeout-s"
            ) from e
        finally:
            pool.shutdown(wait=False)

    def _run_load(self, manifest: Manifest, policy: CacheResetPolicy) -> None:
        report = LoadReport(identity=manifest.identity, kind=manifest.kind, result="error")
        started_at, started = utc_now(), time.perf_counter()
        error: str | None = None
        try:
            if manifest.kind == "lora":
                self._load_lora(manifest, report)
            else:
                self._load_weights(manifest, policy, report)
            report.result = "ok"
        except WeightSyncError as e:
            error = str(e)
            logger.error("hot-load of %s failed: %s", manifest.identity, e)
        except Exception as e:  # a bug: keep serving, report it, log the traceback
            error = f"internal error while loading {manifest.identity!r}: {e!r}"
            logger.exception("hot-load of %s failed with an unexpected error", manifest.identity)
        if isinstance(error, str) and "checksum" in error:
            self.metrics.verify_failures.inc()
        report.total_s = time.perf_counter() - started
        self._finish(manifest, policy, report, started_at, error)

    def _finish(
        self,
        manifest: Manifest,
        policy: CacheResetPolicy,
        report: LoadReport,
        started_at: str,
        error: str | None,
    ) -> None:
        self.ledger.record(
            LedgerEntry(
                identity=manifest.identity,
                kind=manifest.kind,
                parent=manifest.parent,
                source=self._require_store().storage.url,
                result=report.result,
                error=error,
                started_at=started_at,
                finished_at=utc_now(),
                fetch_s=report.fetch_s,
                decode_s=report.decode_s,
                verify_s=report.verify_s,
                drain_s=report.drain_s,
                pause_s=report.pause_s,
                check_s=report.check_s,
                total_s=report.total_s,
                bytes_fetched=report.bytes_fetched,
                reset_prompt_cache=policy,
            )
        )
        m = self.metrics
        m.loads.labels(kind=manifest.kind, result=report.result).inc()
        m.bytes_fetched.inc(report.bytes_fetched)
        for stage in ("fetch", "decode", "verify", "check", "total"):
            m.stage_seconds.labels(stage=stage).observe(getattr(report, f"{stage}_s"))
        if report.result == "ok" and manifest.kind != "lora":
            m.pause.observe(report.pause_s)
        m.cache_entries_dropped.inc(report.cache_entries_dropped)
        if self.storage is not None:
            self.storage.drop(f"{manifest.identity}/")
        with self._state:
            self._last_load = report
            self._stage = "ready" if error is None else "error"
            self._error = error
            self._progress = None
            m.ready.set(1 if self._readiness_locked() else 0)

    def _load_lora(self, manifest: Manifest, report: LoadReport) -> None:
        store = self._require_store()
        t0 = time.perf_counter()
        fetched = self._fetch(store, manifest.identity)
        report.bytes_fetched = sum(len(b) for b in fetched.files.values())
        t1 = time.perf_counter()
        report.fetch_s = t1 - t0
        self._set_stage("decoding")
        self._reached("decoding", manifest.identity)
        tensors = fetched.tensors()  # verified against the manifest's checksums
        report.decode_s = time.perf_counter() - t1
        self._set_stage("swapping")
        # An adapter is separate from the base weights: loading it pauses no one.
        self.engine.load_adapter(manifest.identity, store.read_config(manifest.identity), tensors)

    def _load_weights(
        self, manifest: Manifest, policy: CacheResetPolicy, report: LoadReport
    ) -> None:
        store = self._require_store()
        identity = manifest.identity
        t0 = time.perf_counter()
        fetched = self._fetch(store, identity)
        report.bytes_fetched = sum(len(b) for b in fetched.files.values())
        t1 = time.perf_counter()
        report.fetch_s = t1 - t0
        live = self.engine.named_weights()
        self._set_stage("decoding", {"done": 0, "total": len(manifest.tensors)})
        self._reached("decoding", identity)
        patches: dict[str, Patch]
        if manifest.kind == "base":
            # Same architecture (checked at POST): write the new bits densely in place.
            patches = {
                n: Patch(None, bits(t.contiguous()).copy()) for n, t in fetched.tensors().items()
            }
        else:
            patches = fetched.patches(live)
        t2 = time.perf_counter()
        report.decode_s = t2 - t1
        if manifest.kind == "delta":
            self._set_stage("verifying", {"done": 0, "total": len(patches)})
            self._reached("verifying", identity)
            for i, (name, patch) in enumerate(patches.items()):
                self._set_stage("verifying", {"done": i, "total": len(patches)})
                fetched.verify_patched(name, live, patch)
        # (a base's tensors() already checked every tensor against the manifest)
        t3 = time.perf_counter()
        report.verify_s = t3 - t2
        self._set_stage("swapping")
        self._reached("swapping", identity)
        previous = self._current
        with self._swap_lock.exclusive():
            t4 = time.perf_counter()
            undo = self.engine.apply_patches(patches)
            if policy != "none":
                scope: CacheScope = "all" if policy == "all" else "shared"
                report.cache_entries_dropped = self.engine.reset_prompt_cache(scope)
            with self._state:
                self._current = identity
                self._stage = "checking"
            t5 = time.perf_counter()
        report.drain_s, report.pause_s = t4 - t3, t5 - t4
        del patches
        self._reached("checking", identity)
        mismatched = self._post_swap_mismatches(manifest)
        report.check_s = time.perf_counter() - t5
        if mismatched:
            self._undo_swap(undo, previous)
            raise SnapshotCorruptError(
                f"after applying {identity!r}, tensor checksums do not match the manifest "
                f"({', '.join(mismatched[:5])}); the swap was undone and {previous!r} is served "
                "again — the engine's apply is faulty, report it"
            )
        if manifest.kind == "base":
            self._current_base = identity
            tokenizer_dir = store.local_tokenizer_dir(identity)
            if has_tokenizer(tokenizer_dir):
                assert tokenizer_dir is not None
                self.tokenizer = load_tokenizer(tokenizer_dir)

    def _post_swap_mismatches(self, manifest: Manifest) -> list[str]:
        fmt = manifest.checksum_format
        live = self.engine.named_weights()
        return [
            name
            for name, entry in manifest.tensors.items()
            if checksum_tensor(fmt, live[name]) != entry.checksum
        ]

    def _undo_swap(self, undo: dict[str, Patch], previous: str | None) -> None:
        try:
            with self._swap_lock.exclusive():
                self.engine.apply_patches(undo)
                self.engine.reset_prompt_cache("all")
                with self._state:
                    self._current = previous
        except Exception as e:
            with self._state:
                self._degraded = f"undoing a failed swap failed: {e!r}; restart the replica"
            raise DeploymentError(self._degraded) from e

    # --- serving ------------------------------------------------------------

    @contextmanager
    def generation(self, *, no_wait: bool = False) -> Iterator[StepGuard]:
        """Context of one inference request; yields the engine's `step_guard`.

        `sync`: the request holds the swap lock's shared side throughout, so it
        finishes on the weights it started on. `async`: each decoding step takes
        it, so a swap lands at a token boundary. `no_wait` raises
        `SwapInProgressError` instead of waiting for a pending swap.
        """
        if self._current is None:
            raise DeploymentError("the replica serves no snapshot yet; retry shortly")
        if self.config.transition == "sync":
            with self._swap_lock.shared(wait=not no_wait):
                yield self._fixed_step
        else:
            if no_wait and self._swap_lock.swap_pending:
                raise SwapInProgressError(
                    "a weight swap is in progress; retry shortly, or send the request "
                    "without 'x-weightsync-no-wait: true' to wait for it"
                )
            yield self._locked_step

    def _fixed_step(self) -> AbstractContextManager[str]:
        return nullcontext(self._current or "")

    @contextmanager
    def _locked_step(self) -> Iterator[str]:
        with self._swap_lock.shared():
            yield self._current or ""

    # --- live weights ---------------------------------------------------------

    def weights_checksums(self, checksum_format: str) -> dict[str, Any]:
        """Checksums of the weights this replica computes with right now, per tensor.

        Taken under the shared side of the swap lock, so the identity and the
        checksums describe the same weights (no swap can interleave).
        """
        fmt = canonical_checksum_name(checksum_format)
        with self._swap_lock.shared():
            identity = self._current
            checksums = self.engine.weights_checksums(fmt)
        return {
            "replica_id": self.config.replica_id,
            "current_snapshot_identity": identity,
            "checksum_format": fmt,
            "checksums": checksums,
        }

    # --- ledger -------------------------------------------------------------

    def ledger_entries(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.ledger.entries()]

    def reset_ledger(self) -> int:
        with self._state:
            if self._stage in LOADING_STAGES:
                raise HotloadRefusedError(
                    f"replica {self.config.replica_id} is loading {self._target!r}; reset "
                    "the ledger after it finishes"
                )
            return self.ledger.reset()

    def close(self) -> None:
        loader = self._loader
        if loader is not None and loader.is_alive():
            loader.join(timeout=30)
        if self.storage is not None:
            self.storage.close()
        self.engine.close()
        self.ledger.close()
