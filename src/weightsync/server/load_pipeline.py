"""The load pipeline: every load of a replica from request to a defined end, and what it serves.

    idle ──start──► (startup load) ──► ready
    ready|error ──POST hot_load──► fetching ──► decoding ──► verifying ──► swapping
                                       │            │            │            │
                                       ▼            ▼            ▼            ▼
                                     error ◄──────────────────────────── checking ──► ready
                                       ▲                                                │
                                       └──────────── ledger write failed (degraded) ◄───┘

Everything that can fail runs before the swap lock: `fetching` reads every
weight file and checks its checksum; `decoding` checks and parses every other
file the snapshot uses (config, tokenizer, chat template, index) and turns the
payloads into patches against the live weights (read only); `verifying`
checks each patch against the manifest — from its changed elements when the
manifest carries change sums (FORMAT.md §4.2), else by rebuilding the patched
tensor chunk by chunk against its full checksum — so a corrupt snapshot never
touches the live weights. `swapping`
holds the swap lock's exclusive side (the serving pause: apply in place, or with
the torch engine's buffered swap point the model at the spare copy written just
before, + prompt-cache reset), and the new identity, config and tokenizer become current
inside it, so every answer is labelled with the weights it was computed on.
`checking` re-checksums the live weights against the manifest; on a mismatch
the previous weights are read again from where the ledger says they came from
(verified) and put back together with their identity — no undo copy of the
patched elements is held, and a patch denser than its tensor is held as the
tensor's new bits, so a delta costs at most about one copy of the model; a
base's patches are views of its fetched bytes, so it costs one copy too.
Then the load is written to the ledger. A ledger write that still fails
after its bounded retries ends the load as `error` with the replica `degraded`:
it keeps serving the verified new weights, reports that the ledger is behind,
and writes the missing rows with the next load (or a ledger reset clears them).
Any other failure leaves `stage: "error"` naming the target while the replica
keeps serving what it had. One load runs at a time: a POST for another identity
while one runs is refused (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsync.codec import Patch, checksum_tensor
from weightsync.errors import (
    ChecksumMismatchError,
    DeploymentError,
    HotloadRefusedError,
    HotloadTimeoutError,
    LedgerError,
    SnapshotCorruptError,
    WeightSyncError,
)
from weightsync.server.engines.base import CacheScope, Engine
from weightsync.server.ledger import Ledger, LedgerEntry, utc_now
from weightsync.server.load_report import LoadReport
from weightsync.server.metrics import ReplicaMetrics
from weightsync.server.prefetch import PrefetchingStorage
from weightsync.server.sources import (
    ModelWeights,
    read_recorded_weights,
    read_side_files,
    verified_tokenizer,
)
from weightsync.server.stage_hooks import StageHook
from weightsync.server.swap_lock import SwapLock
from weightsync.server.tokenizer import TextTokenizer, load_tokenizer
from weightsync.snapshot import FetchedSnapshot, Manifest, SnapshotStore
from weightsync.snapshot.layout import CONFIG_FILE
from weightsync.wire import LOADING_STAGES, CacheResetPolicy, Stage

logger = logging.getLogger(__name__)

#: How many unloaded adapter names a replica remembers, to refuse requests naming them.
UNLOADED_ADAPTERS_REMEMBERED = 4096
#: Threads verifying a delta's tensors before the swap (serving goes on meanwhile).
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True, kw_only=True)
class Served:
    """What the replica serves, verified: the load that put it there, its config and tokenizer."""

    load: LoadReport
    config: dict[str, Any]
    tokenizer: TextTokenizer | None

    @property
    def identity(self) -> str:
        return self.load.identity


@dataclass(kw_only=True)
class _Prepared:
    """A base/delta load checked end to end, waiting for the swap lock."""

    patches: dict[str, Patch]
    config: dict[str, Any]
    tokenizer: TextTokenizer | None  # None: keep the served one (a delta)


class LoadPipeline:
    """Runs a replica's loads one at a time; owns stage, progress, timings and load records."""

    def __init__(
        self,
        *,
        replica_id: str,
        engine: Engine,
        store: SnapshotStore | None,
        storage: PrefetchingStorage | None,
        ledger: Ledger,
        metrics: ReplicaMetrics,
        swap_lock: SwapLock,
        fetch_timeout_s: float,
        tokenizer_root: Path,
        max_adapters: int,
        on_stage: StageHook | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.engine = engine
        self.store = store
        self.storage = storage
        self.ledger = ledger
        self.metrics = metrics
        self.swap_lock = swap_lock
        self.fetch_timeout_s = fetch_timeout_s
        self.tokenizer_root = tokenizer_root
        self.max_adapters = max_adapters
        #: Adapters unloaded past the limit (newest last, bounded): a request naming one is
        #: refused rather than answered by the base weights.
        self._unloaded_adapters: OrderedDict[str, None] = OrderedDict()
        self._on_stage = on_stage
        self._state = threading.Lock()
        self._served: Served | None = None
        self._stage: Stage = "idle"
        self._target: str | None = None
        self._error: str | None = None
        self._progress: dict[str, Any] | None = None
        self._last_load: LoadReport | None = None
        #: The ledger is behind what is served (a write failed); cleared by the next write.
        self._ledger_behind: str | None = None
        #: The live weights are not known to be any snapshot (a restore failed): not ready.
        self._weights_unknown: str | None = None
        self._unwritten: list[LedgerEntry] = []
        self._loader: threading.Thread | None = None
        #: Long-polls of the status (`wait_settled`), woken when no load runs any more.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # --- what is served -------------------------------------------------------

    @property
    def served(self) -> Served | None:
        return self._served

    def readiness(self) -> bool:
        """True only while the replica serves, verified, the identity it reports."""
        with self._state:
            return self._readiness_locked()

    def _readiness_locked(self) -> bool:
        return (
            self._served is not None
            and self._weights_unknown is None
            and self._stage not in ("swapping", "checking")
        )

    def _publish_locked(self) -> None:
        # One place sets the gauge, from the same state status reports, and wakes the
        # long-polls once no load runs.
        self.metrics.ready.set(1 if self._readiness_locked() else 0)
        if self._stage not in LOADING_STAGES:
            for loop, waiter in self._waiters:
                # A closed event loop raises: nobody waits there any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, waiter)
            self._waiters.clear()

    async def wait_settled(self, timeout_s: float) -> None:
        """Return as soon as no load runs (at once if none does), or after `timeout_s`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._state:
            if self._stage not in LOADING_STAGES:
                return
            self._waiters.append((loop, waiter))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout_s)
        finally:
            with self._state:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))

    def status(self) -> dict[str, Any]:
        """The load-related fields of this replica's status entry."""
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
                "current_snapshot_identity": self._served.identity if self._served else None,
                "readiness": self._readiness_locked(),
                "loading_state": loading_state,
                "last_load": self._last_load.to_json() if self._last_load else None,
                "degraded": self._weights_unknown or self._ledger_behind,
            }

    # --- startup --------------------------------------------------------------

    def start(
        self, weights: ModelWeights, load: LoadReport, *, recovered: bool, adapters: list[str]
    ) -> None:
        """Serve `weights` (already verified) as `load.identity`, record it, reload `adapters`."""
        started = time.perf_counter()
        load.started_at = utc_now()
        with self.engine.swap(load.identity):
            self.engine.load_base(
                weights.config, weights.tensors, tokenizer_dir=weights.tokenizer_dir
            )
        tokenizer = load_tokenizer(weights.tokenizer_dir) if weights.tokenizer_dir else None
        if tokenizer is not None and load.source_kind == "storage":
            tokenizer.directory = Path(load.identity)
        load.result = "ok"
        load.total_s = time.perf_counter() - started
        load.finished_at = utc_now()
        with self._state:
            self._served = Served(load=load, config=dict(weights.config), tokenizer=tokenizer)
            self._stage, self._target = "ready", load.identity
        kept: list[str] = []
        for identity in adapters[-self.max_adapters :]:
            self._load_adapter_now(identity)
            kept.append(identity)
        # At startup a ledger that cannot be written is fatal: start again once it can.
        self.ledger.record(LedgerEntry(load=load, recovered=recovered), adapters=kept)
        with self._state:
            self._publish_locked()

    def _load_adapter_now(self, identity: str) -> None:
        store = self._require_store()
        fetched = store.fetch(identity)
        self.engine.load_adapter(identity, store.read_config(identity), fetched.tensors())

    # --- accepting a load -----------------------------------------------------

    def claim(self, identity: str) -> str | None:
        """`"loading"`/`"already_serving"` when a POST for `identity` has nothing to start.

        Raises `HotloadRefusedError` while another identity loads.
        """
        with self._state:
            return self._claim_locked(identity)

    def _claim_locked(self, identity: str) -> str | None:
        if self._stage in LOADING_STAGES:
            if self._target == identity:
                return "loading"
            raise HotloadRefusedError(
                f"replica {self.replica_id} is loading {self._target!r}; one load runs "
                f"at a time — retry {identity!r} once GET /hot_load/v1/models/hot_load shows "
                "it finished"
            )
        current = self._served.identity if self._served else None
        if identity == current or identity in self.engine.loaded_adapters():
            return "already_serving"
        return None

    def begin(self, manifest: Manifest, policy: CacheResetPolicy) -> str | None:
        """Start loading `manifest` in the background; or what `claim` answers meanwhile."""
        identity = manifest.identity
        with self._state:
            # Re-check under the lock: another POST may have started a load meanwhile.
            early = self._claim_locked(identity)
            if early is not None:
                return early
            self._stage, self._target, self._error = "fetching", identity, None
            self._progress = {"total_bytes": sum(f.size_bytes for f in manifest.files.values())}
            self._publish_locked()
            self._loader = threading.Thread(
                target=self._run,
                args=(manifest, policy),
                name=f"hot-load-{identity}",
                daemon=True,
            )
            self._loader.start()
        return None

    # --- one load, in the loader thread ----------------------------------------

    def _set_stage(self, stage: Stage, progress: dict[str, Any] | None = None) -> None:
        with self._state:
            self._stage = stage
            self._progress = progress
            self._publish_locked()

    def _reached(self, stage: Stage, identity: str) -> None:
        """Tell the `on_stage` hook (if any) that the load of `identity` began `stage`."""
        if self._on_stage is not None:
            self._on_stage(stage, identity)

    def _run(self, manifest: Manifest, policy: CacheResetPolicy) -> None:
        """The whole load; whatever happens, it ends with the stage `ready` or `error`."""
        store = self._require_store()
        report = LoadReport(
            identity=manifest.identity,
            kind=manifest.kind,
            parent=manifest.parent,
            source=store.storage.url,
            source_kind="storage",
            started_at=utc_now(),
            reset_prompt_cache=policy,
            cannot_prove=list(manifest.cannot_prove),
        )
        started = time.perf_counter()
        error: str | None = None
        failure: Exception | None = None
        kept: list[str] | None = None
        try:
            if manifest.kind == "lora":
                kept = self._load_lora(store, manifest, report)
            else:
                self._load_weights(store, manifest, policy, report)
            report.result = "ok"
        except WeightSyncError as e:
            error, failure = str(e), e
            logger.error("hot-load of %s failed: %s", manifest.identity, e)
        except Exception as e:  # a bug: keep serving, report it, log the traceback
            error, failure = f"internal error while loading {manifest.identity!r}: {e!r}", e
            logger.exception("hot-load of %s failed with an unexpected error", manifest.identity)
        report.error = error
        report.total_s = time.perf_counter() - started
        report.finished_at = utc_now()
        try:
            self._finish(manifest, report, kept, failure)
        except Exception as e:  # never a dead loader with a stuck stage
            logger.exception("finishing the hot-load of %s failed", manifest.identity)
            with self._state:
                self._stage = "error"
                self._error = f"internal error while finishing {manifest.identity!r}: {e!r}"
                self._progress = None
                self._publish_locked()

    def _finish(
        self,
        manifest: Manifest,
        report: LoadReport,
        kept: list[str] | None,
        failure: Exception | None,
    ) -> None:
        """Record the load (ledger, metrics, status); `failure` is what ended it, if it failed."""
        written = self._write(LedgerEntry(load=report), adapters=kept)
        m = self.metrics
        m.loads.labels(kind=manifest.kind, result=report.result).inc()
        m.bytes_fetched.inc(report.bytes_fetched)
        if isinstance(failure, ChecksumMismatchError):
            m.verify_failures.inc()
        for stage in ("fetch", "decode", "verify", "stage", "check", "total"):
            m.stage_seconds.labels(stage=stage).observe(getattr(report, f"{stage}_s"))
        if report.result == "ok" and manifest.kind != "lora":
            m.pause.observe(report.pause_s)
        m.cache_entries_dropped.inc(report.cache_entries_dropped)
        if self.storage is not None:
            self.storage.drop(f"{manifest.identity}/")
        error = report.error
        if written is not None:
            error = (
                f"{error}; also: {written}"
                if error
                else f"{manifest.identity!r} was loaded and verified and is served, but {written}"
            )
        with self._state:
            self._last_load = report
            self._stage = "ready" if error is None else "error"
            self._error = error
            self._progress = None
            self._publish_locked()
        self.engine.settle()  # after the status says the load ended: nobody waits on it

    def _write(self, entry: LedgerEntry, *, adapters: list[str] | None = None) -> str | None:
        """Append `entry` (after any rows an earlier failure left unwritten); the failure, or None.

        A failure marks the replica degraded (the ledger is behind what it serves); a
        later successful write, or a reset, clears it.
        """
        with self._state:
            pending = [*self._unwritten, entry]
        done = 0
        try:
            for row in pending:
                last = done == len(pending) - 1
                self.ledger.record(row, adapters=adapters if last else None)
                done += 1
        except LedgerError as e:
            behind = (
                f"the ledger write failed ({e}); the replica is degraded: a restart now would "
                "recover an older snapshot. The row is written with the next load (or reset "
                "the ledger)"
            )
            with self._state:
                self._unwritten = pending[done:]
                self._ledger_behind = behind
            logger.error("replica %s: %s", self.replica_id, behind)
            return behind
        with self._state:
            self._unwritten = []
            self._ledger_behind = None
        return None

    def _fetch(self, store: SnapshotStore, identity: str) -> FetchedSnapshot:
        """`store.fetch(identity)`, failing after the fetch policy's `timeout_s`.

        A read that never returns (a hung connection) cannot be interrupted; its
        thread is left behind and its result discarded, so the load still ends,
        loudly, in `error` while the replica keeps serving.
        """
        self._reached("fetching", identity)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fetch-{identity}")
        try:
            return pool.submit(store.fetch, identity).result(timeout=self.fetch_timeout_s)
        except FutureTimeoutError as e:
            current = self._served.identity if self._served else None
            raise HotloadTimeoutError(
                f"fetching snapshot {identity!r} from {store.storage.url} did not finish within "
                f"{self.fetch_timeout_s:g}s (fetch timeout); replica {self.replica_id} keeps "
                f"serving {current!r} — check the storage, or raise --fetch-timeout-s"
            ) from e
        finally:
            pool.shutdown(wait=False)

    def _load_lora(self, store: SnapshotStore, manifest: Manifest, report: LoadReport) -> list[str]:
        """Load an adapter beside the base (no pause); past the limit, unload the LRU ones."""
        t0 = time.perf_counter()
        fetched = self._fetch(store, manifest.identity)
        report.bytes_fetched = sum(len(b) for b in fetched.files.values())
        t1 = time.perf_counter()
        report.fetch_s = t1 - t0
        self._set_stage("decoding")
        self._reached("decoding", manifest.identity)
        tensors = fetched.tensors()  # verified against the manifest's checksums
        adapter_config = store.read_config(manifest.identity)  # verified and parsed
        report.decode_s = time.perf_counter() - t1
        self._set_stage("swapping")
        self.engine.load_adapter(manifest.identity, adapter_config, tensors)
        with self._state:
            self._unloaded_adapters.pop(manifest.identity, None)
        loaded = self.engine.loaded_adapters()  # least recently used first
        for name in loaded[: max(0, len(loaded) - self.max_adapters)]:
            if name != manifest.identity:
                self.engine.unload_adapter(name)
                with self._state:
                    self._unloaded_adapters[name] = None
                    while len(self._unloaded_adapters) > UNLOADED_ADAPTERS_REMEMBERED:
                        self._unloaded_adapters.popitem(last=False)
                logger.info("unloaded LoRA adapter %s (limit %d, least recently used)",
                            name, self.max_adapters)  # fmt: skip
        return self.engine.loaded_adapters()

    def was_unloaded(self, adapter: str) -> bool:
        """Whether `adapter` was loaded here and unloaded past `max_adapters` since."""
        with self._state:
            return adapter in self._unloaded_adapters

    def _prepare(self, store: SnapshotStore, manifest: Manifest, report: LoadReport) -> _Prepared:
        """Fetch, check every file, decode and verify: all that can fail, before the swap."""
        identity = manifest.identity
        t0 = time.perf_counter()
        fetched = self._fetch(store, identity)
        report.bytes_fetched = sum(len(b) for b in fetched.files.values())
        t1 = time.perf_counter()
        report.fetch_s = t1 - t0
        live = self.engine.named_weights()
        self._set_stage("decoding", {"done": 0, "total": len(manifest.tensors)})
        self._reached("decoding", identity)
        side = read_side_files(store, manifest)  # config, tokenizer, template: checked, parsed
        config = json.loads(side[CONFIG_FILE]) if CONFIG_FILE in side else {}
        tokenizer: TextTokenizer | None = None
        patches: dict[str, Patch]
        if manifest.kind == "base":
            _, tokenizer = verified_tokenizer(store, manifest, side, self.tokenizer_root)
            # Same model (checked at POST): write the new bits densely in place, straight
            # from the fetched bytes (read-only views, each tensor checked against the
            # manifest here): a base costs one copy of the model, what was fetched.
            patches = {n: Patch(None, b) for n, b in fetched.tensor_bits().items()}
        else:
            # Each shard's bytes are dropped once its tensors are decoded.
            patches = fetched.patches(live, dense_when_smaller=True, release=True)
        t2 = time.perf_counter()
        report.decode_s = t2 - t1
        if manifest.kind == "delta":
            self._set_stage("verifying", {"done": 0, "total": len(patches)})
            self._reached("verifying", identity)
            # Tensors in parallel: the copy and the compiled scatter release the GIL.
            # The first failure cancels the tensors not started yet and is raised.
            pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix=f"verify-{identity}")
            try:
                futures = [
                    pool.submit(fetched.verify_patched, n, live, p) for n, p in patches.items()
                ]
                for i, future in enumerate(as_completed(futures), start=1):
                    future.result()
                    self._set_stage("verifying", {"done": i, "total": len(patches)})
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        # (a base's tensor_bits() already checked every tensor against the manifest)
        report.verify_s = time.perf_counter() - t2
        return _Prepared(patches=patches, config=config, tokenizer=tokenizer)

    def _load_weights(
        self,
        store: SnapshotStore,
        manifest: Manifest,
        policy: CacheResetPolicy,
        report: LoadReport,
    ) -> None:
        identity = manifest.identity
        prepared = self._prepare(store, manifest, report)
        # Before the swap lock (serving goes on): e.g. the vllm engine's push file, the
        # torch engine's buffered swap writing its spare copy.
        t_stage = time.perf_counter()
        self.engine.stage_patches(prepared.patches)
        report.stage_s = time.perf_counter() - t_stage
        previous = self._served
        self._set_stage("swapping")
        self._reached("swapping", identity)
        tokenizer = prepared.tokenizer
        if tokenizer is None and previous is not None:
            tokenizer = previous.tokenizer
        t3 = time.perf_counter()
        applied: Exception | None = None
        with self.swap_lock.exclusive(), self.engine.swap(identity):
            t4 = time.perf_counter()
            try:
                self.engine.apply_patches(prepared.patches, keep_undo=False)
            except Exception as e:  # noqa: BLE001  (any failure: restored from source below)
                applied = e
            if policy != "none":
                scope: CacheScope = "all" if policy == "all" else "shared"
                report.cache_entries_dropped = self.engine.reset_prompt_cache(scope)
            with self._state:
                # The new identity is current from the moment its weights are live, so
                # every answer computed on them during the check is labelled with it; a
                # failed check puts the previous weights and identity back together.
                self._served = Served(load=report, config=prepared.config, tokenizer=tokenizer)
                self._stage = "checking"
                self._publish_locked()
            t5 = time.perf_counter()
        report.drain_s, report.pause_s = t4 - t3, t5 - t4
        prepared.patches.clear()  # the changed data: freed before the check
        self._reached("checking", identity)
        mismatched = [] if applied is not None else self._mismatches(manifest)
        report.check_s = time.perf_counter() - t5
        if applied is not None or mismatched:
            what = (
                f"applying {identity!r} failed ({applied})"
                if applied is not None
                else f"after applying {identity!r}, tensor checksums do not match the manifest "
                f"({', '.join(mismatched[:5])})"
            )
            self._restore(previous, what)
            # A mismatch with the manifest is a verify failure (its own metric); a failed
            # apply is the engine's.
            failed = SnapshotCorruptError if applied is not None else ChecksumMismatchError
            raise failed(
                f"{what}; the previous weights ({previous.identity if previous else None!r}) "
                "were read again and are served — the engine's apply is faulty, report it"
            )
        if manifest.kind == "base":
            self._forget_tokenizers(keep=identity)

    def _mismatches(self, manifest: Manifest) -> list[str]:
        """Tensors whose live bits do not hash to the manifest's checksum, hashed on
        `VERIFY_THREADS` threads (xxh3 and the other hashes release the GIL: the 0.6B
        shape's 1.5 GB hash in 110 ms on one thread of this 2-core machine, 78 on two)."""
        fmt = manifest.checksum_format
        live = self.engine.named_weights()
        names = list(manifest.tensors)
        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="check") as pool:
            sums = list(pool.map(lambda name: checksum_tensor(fmt, live[name]), names))
        return [n for n, s in zip(names, sums, strict=True) if s != manifest.tensors[n].checksum]

    def _restore(self, previous: Served | None, what: str) -> None:
        """Put back the weights `previous` names, re-read and verified from their source."""
        try:
            if previous is None:
                raise DeploymentError("nothing was served before")
            weights = read_recorded_weights(
                self.store, previous.load, ledger=self.ledger.path,
                tokenizer_root=self.tokenizer_root,
            )  # fmt: skip
            with self.swap_lock.exclusive(), self.engine.swap(previous.identity):
                self.engine.load_base(
                    weights.config, weights.tensors, tokenizer_dir=weights.tokenizer_dir
                )
                self.engine.reset_prompt_cache("all")
                with self._state:
                    self._served = previous
        except Exception as e:
            with self._state:
                self._weights_unknown = (
                    f"{what}, and putting the previous weights back failed: {e}; the live "
                    "weights are no verified snapshot — restart the replica"
                )
            raise DeploymentError(self._weights_unknown) from e

    def _forget_tokenizers(self, *, keep: str) -> None:
        """Remove verified tokenizer copies of bases no longer served (they are re-made on use)."""
        if not self.tokenizer_root.is_dir():
            return
        for path in self.tokenizer_root.iterdir():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    # --- ledger and shutdown --------------------------------------------------

    def reset_ledger(self) -> int:
        """Forget every load (refused while one runs); clears a ledger that was behind."""
        with self._state:
            if self._stage in LOADING_STAGES:
                raise HotloadRefusedError(
                    f"replica {self.replica_id} is loading {self._target!r}; reset "
                    "the ledger after it finishes"
                )
        removed = self.ledger.reset()
        with self._state:
            self._unwritten = []
            self._ledger_behind = None
        return removed

    def _require_store(self) -> SnapshotStore:
        if self.store is None:
            raise DeploymentError("this replica has no snapshot storage")
        return self.store

    def join(self, timeout_s: float) -> None:
        loader = self._loader
        if loader is not None and loader.is_alive():
            loader.join(timeout=timeout_s)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


__all__ = ["LoadPipeline", "Served"]
