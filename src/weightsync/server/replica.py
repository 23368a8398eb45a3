"""One replica: an engine, its storage and ledger, and the load pipeline around them.

The hot-load state machine (drawn in `load_pipeline.py`) runs in `LoadPipeline`;
the replica validates and admits requests, chooses its starting weights (the
ledger's last verified load, re-verified, else its start source), serves
generations under the swap lock, and answers status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from weightsync.codec import canonical_checksum_name, change_sum, get_codec, patch_kernels
from weightsync.errors import DeploymentError, InvalidInputError, SwapInProgressError
from weightsync.identity import validate_identity
from weightsync.server.admission import check_admissible
from weightsync.server.allocator import return_large_buffers_to_the_os
from weightsync.server.config import ReplicaConfig
from weightsync.server.engines import get_engine
from weightsync.server.engines.base import Engine, StepGuard
from weightsync.server.fetch_policy import RetryingStorage
from weightsync.server.ledger import Ledger
from weightsync.server.load_pipeline import LoadPipeline
from weightsync.server.load_report import LoadReport
from weightsync.server.metrics import ReplicaMetrics
from weightsync.server.prefetch import (
    PrefetchingStorage,
    hint_snapshot,
    read_ahead_dropped_on_refusal,
)
from weightsync.server.sources import (
    ModelWeights,
    fingerprint,
    read_model_dir,
    read_recorded_weights,
    read_snapshot_weights,
)
from weightsync.server.stage_hooks import StageHook
from weightsync.server.swap_lock import SwapLock
from weightsync.server.tokenizer import TextTokenizer
from weightsync.snapshot import SnapshotStore
from weightsync.storage import Storage, open_storage
from weightsync.wire import (
    HintRequest,
    HotLoadRequest,
    cache_reset_policy,
)

logger = logging.getLogger(__name__)

#: Where verified copies of the served base's tokenizer files live, under the state dir.
TOKENIZERS_DIR = "tokenizers"


class Replica:
    """Serves one model and hot-loads snapshots into it (see `load_pipeline`)."""

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
            engine if engine is not None else get_engine(config.engine, **config.engine_kwargs)
        )
        self.metrics = metrics if metrics is not None else ReplicaMetrics(CollectorRegistry())
        self.storage: PrefetchingStorage | None = None
        self.store: SnapshotStore | None = None
        if storage is not None or config.storage is not None:
            inner = storage if storage is not None else open_storage(config.storage or "")
            self.storage = PrefetchingStorage(RetryingStorage(inner, config.fetch))
            self.store = SnapshotStore(self.storage)
        self.ledger = Ledger(config.state_dir)
        self.recovered_from_ledger = False
        self._swap_lock = SwapLock()
        self.pipeline = LoadPipeline(
            replica_id=config.replica_id,
            engine=self.engine,
            store=self.store,
            storage=self.storage,
            ledger=self.ledger,
            metrics=self.metrics,
            swap_lock=self._swap_lock,
            fetch_timeout_s=config.fetch.timeout_s,
            tokenizer_root=Path(config.state_dir) / TOKENIZERS_DIR,
            max_adapters=config.max_adapters,
            on_stage=on_stage,
        )

    # --- startup ------------------------------------------------------------

    def start(self) -> None:
        """Load the starting weights: the ledger's last verified load (re-verified), else the
        start source. A ledger load that cannot be verified is refused, never replaced."""
        last, adapters = (None, []) if self.ledger.requires_base else self.ledger.recovery_plan()
        started = time.perf_counter()
        # Freed tensor-sized buffers leave the RSS (server/allocator.py), from the base on.
        return_large_buffers_to_the_os()
        # Compile the in-place patch and change-sum kernels now, not inside the first
        # delta's pause or verify.
        patch_kernels.warm_up()
        change_sum.warm_up()
        tokenizer_root = Path(self.config.state_dir) / TOKENIZERS_DIR
        weights: ModelWeights
        if last is not None:
            logger.info(
                "recovering %s (%s) from the ledger %s", last.identity, last.kind, self.ledger.path
            )
            weights = read_recorded_weights(
                self.store,
                last.load,
                ledger=self.ledger.path,
                tokenizer_root=tokenizer_root,
                parents={
                    e.identity: e.load.parent for e in self.ledger.entries() if e.result == "ok"
                },
            )
            self.recovered_from_ledger = True
            prior = last.load
            load = LoadReport(
                identity=prior.identity, kind=prior.kind, parent=prior.parent,
                source=prior.source, source_kind=prior.source_kind,
                weights_fingerprint=prior.weights_fingerprint,
            )  # fmt: skip
        elif self.config.snapshot is not None:
            store = self._require_store()
            identity = self.config.snapshot
            manifest = store.read_manifest(identity)
            weights = read_snapshot_weights(store, identity, tokenizer_root)
            load = LoadReport(
                identity=identity, kind=manifest.kind, parent=manifest.parent,
                source=store.storage.url, source_kind="storage",
                cannot_prove=list(manifest.cannot_prove),
            )  # fmt: skip
        else:
            model_dir = Path(self.config.model_dir or ".").resolve()
            weights = read_model_dir(model_dir)
            load = LoadReport(
                identity=self.config.start_identity, kind="base", source=str(model_dir),
                source_kind="model_dir", weights_fingerprint=fingerprint(weights.tensors),
            )  # fmt: skip
        self.pipeline.start(weights, load, recovered=self.recovered_from_ledger, adapters=adapters)
        logger.info(
            "replica %s serving %s (%s%s) in %.2fs",
            self.config.replica_id,
            load.identity,
            load.kind,
            ", recovered from ledger" if self.recovered_from_ledger else "",
            time.perf_counter() - started,
        )

    # --- status -------------------------------------------------------------

    @property
    def current_identity(self) -> str | None:
        served = self.pipeline.served
        return served.identity if served else None

    @property
    def model_config(self) -> dict[str, Any]:
        served = self.pipeline.served
        return served.config if served else {}

    @property
    def tokenizer(self) -> TextTokenizer | None:
        served = self.pipeline.served
        return served.tokenizer if served else None

    def readiness(self) -> bool:
        """True only while the replica serves, verified, the identity it reports."""
        return self.pipeline.readiness()

    def status(self) -> dict[str, Any]:
        """This replica's entry in `GET /hot_load/v1/models/hot_load`."""
        load = self.pipeline.status()
        return {
            "replica_id": self.config.replica_id,
            "current_snapshot_identity": load["current_snapshot_identity"],
            "readiness": load["readiness"],
            "loading_state": load["loading_state"],
            "loaded_adapters": [
                {"identity": name, "status": "loaded"} for name in self.engine.loaded_adapters()
            ],
            "last_load": load["last_load"],
            "recovered_from_ledger": self.recovered_from_ledger,
            "requires_base": self.ledger.requires_base,
            "transition": self.config.transition,
            "engine": self.engine.name,
            "inference_url": self.engine.inference_url,
            "degraded": load["degraded"],
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
        early = self.pipeline.claim(identity)
        if early is not None:
            return self._answer(early, identity)
        store = self._require_store()
        with read_ahead_dropped_on_refusal(self.storage, identity):
            # A Fireworks delta directory does not name its parent; the request does.
            parent = meta.previous_snapshot_identity if meta is not None else None
            manifest = store.read_manifest(identity, parent=parent)
            check_admissible(
                manifest,
                meta,
                replica_id=self.config.replica_id,
                current=self.current_identity,
                requires_base=self.ledger.requires_base,
                engine=self.engine,
                served_config=self.model_config,
                read_snapshot_config=lambda: store.read_config(manifest.identity),
            )
        early = self.pipeline.begin(manifest, policy)
        if early is not None:
            return self._answer(early, identity)
        logger.info("hot-load of %s (%s) accepted", identity, manifest.kind)
        return self._answer("accepted", identity)

    def _answer(self, status: str, identity: str) -> dict[str, Any]:
        return {"status": status, "replica_id": self.config.replica_id, "identity": identity}

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

    # --- serving ------------------------------------------------------------

    @contextmanager
    def generation(self, *, no_wait: bool = False) -> Iterator[StepGuard]:
        """Context of one inference request; yields the engine's `step_guard`.

        `sync`: the request holds the swap lock's shared side throughout, so it
        finishes on the weights it started on. `async`: each decoding step takes
        it, so a swap lands at a token boundary. `no_wait` raises
        `SwapInProgressError` instead of waiting for a pending swap.
        """
        if self.current_identity is None:
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
        return nullcontext(self.current_identity or "")

    @contextmanager
    def _locked_step(self) -> Iterator[str]:
        with self._swap_lock.shared():
            yield self.current_identity or ""

    # --- live weights ---------------------------------------------------------

    def weights_checksums(self, checksum_format: str) -> dict[str, Any]:
        """Checksums of the weights this replica computes with right now, per tensor.

        Taken under the shared side of the swap lock, so the identity and the
        checksums describe the same weights (no swap can interleave).
        """
        fmt = canonical_checksum_name(checksum_format)
        with self._swap_lock.shared():
            identity = self.current_identity
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
        return self.pipeline.reset_ledger()

    def close(self) -> None:
        self.pipeline.join(timeout_s=30)
        if self.storage is not None:
            self.storage.close()
        self.engine.close()
        self.ledger.close()
