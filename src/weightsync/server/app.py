"""The FastAPI app of one replica: hot-load API, ledger, control plane, inference, health, metrics.

Routes speak the wire contract (`weightsync.wire`): requests are parsed into
its models at the edge and answers are its models. Inference runs on its own
bounded executor (`inference_admission`); the control routes (health, status,
hot-load, ledger, weights, metrics) run on the server's thread pool, where no
completion ever queues, so a flood of completions cannot delay them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from weightsync import __version__
from weightsync.codec import DEFAULT_CHECKSUM
from weightsync.server.control_plane import (
    ControlPlane,
    DeploymentView,
    build_control_plane_router,
)
from weightsync.server.http_errors import PrivatePaths, install_error_handlers, redact_error_fields
from weightsync.server.inference_admission import InferenceAdmission
from weightsync.server.metrics import CONTENT_TYPE_LATEST
from weightsync.server.middleware import DeploymentMiddleware, GuardMiddleware, MetricsMiddleware
from weightsync.server.openai_api import build_openai_router
from weightsync.server.replica import Replica
from weightsync.wire import (
    HEALTH_PATH,
    HINT_PATH,
    HOT_LOAD_PATH,
    HOT_LOAD_WAIT_PARAM,
    LEDGER_PATH,
    LEDGER_RESET_PATH,
    MAX_HOT_LOAD_WAIT_S,
    METRICS_PATH,
    WEIGHTS_PATH,
    HintAnswer,
    HintAnswers,
    HintRequest,
    HotLoadAnswer,
    HotLoadRequest,
    HotLoadStatus,
    LedgerAnswers,
    LedgerEntry,
    LedgerReset,
    LedgerResetAnswers,
    ReplicaLedger,
    ReplicaStatus,
    WeightsAnswers,
    WeightsChecksums,
)

logger = logging.getLogger(__name__)


def create_app(replica: Replica, *, close_replica_on_shutdown: bool = True) -> FastAPI:
    """The HTTP app of one started replica (`Replica.start()` already ran)."""

    admission = InferenceAdmission(replica.config.inference, replica.metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        admission.close()
        if close_replica_on_shutdown:
            logger.info("replica %s shutting down", replica.config.replica_id)
            await run_in_threadpool(replica.close)

    app = FastAPI(title="weightsync replica", version=__version__, lifespan=lifespan)
    private_paths: PrivatePaths = {
        replica.storage.url if replica.storage is not None else None: "<storage>",
        replica.config.state_dir: "<state dir>",
        replica.config.model_dir: "<model dir>",
    }
    install_error_handlers(app, private_paths=private_paths)

    def redacted_status() -> dict[str, Any]:
        return dict(redact_error_fields(replica.status(), private_paths))

    served = replica.config.served
    # Added first, so it runs inside the guard: a wrong key gets 401 before any 404.
    app.add_middleware(DeploymentMiddleware, served=served)
    app.add_middleware(
        GuardMiddleware,
        api_key=replica.config.api_key,
        max_body_bytes=replica.config.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=replica.metrics)
    app.state.replica = replica

    @app.get(HEALTH_PATH)
    def health() -> dict[str, str]:
        """Liveness only: the process answers. Readiness is in the hot-load status."""
        return {"status": "ok", "replica_id": replica.config.replica_id}

    @app.get(METRICS_PATH)
    def metrics() -> Response:
        return Response(replica.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(HOT_LOAD_PATH)
    def hot_load(body: HotLoadRequest) -> HotLoadAnswer:
        return HotLoadAnswer.model_validate(replica.request_hot_load(body))

    @app.get(HOT_LOAD_PATH)
    async def hot_load_status(
        wait_s: float = Query(default=0.0, alias=HOT_LOAD_WAIT_PARAM, ge=0, le=MAX_HOT_LOAD_WAIT_S),
    ) -> HotLoadStatus:
        """The status now; with `wait_s`, once the running load ends (or `wait_s` passed).

        The wait holds no thread: the load pipeline wakes it from the loader thread.
        """
        if wait_s > 0:
            await replica.pipeline.wait_settled(wait_s)
        status = await run_in_threadpool(redacted_status)
        return HotLoadStatus(replicas=[ReplicaStatus.model_validate(status)])

    @app.post(HINT_PATH)
    def hot_load_hint(body: HintRequest) -> HintAnswers:
        return HintAnswers(replicas=[HintAnswer.model_validate(replica.hint(body))])

    @app.get(WEIGHTS_PATH)
    def weights(checksum_format: str = DEFAULT_CHECKSUM) -> WeightsAnswers:
        """Checksums of the live weights, computed now: proof of what the replica serves."""
        checksums = WeightsChecksums.model_validate(replica.weights_checksums(checksum_format))
        return WeightsAnswers(replicas=[checksums])

    @app.get(LEDGER_PATH)
    def ledger() -> LedgerAnswers:
        entries = [
            LedgerEntry.model_validate(redact_error_fields(e, private_paths))
            for e in replica.ledger_entries()
        ]
        return LedgerAnswers(
            replicas=[ReplicaLedger(replica_id=replica.config.replica_id, entries=entries)]
        )

    @app.post(LEDGER_RESET_PATH)
    def ledger_reset() -> LedgerResetAnswers:
        removed = replica.reset_ledger()
        reset = LedgerReset(
            replica_id=replica.config.replica_id, removed_entries=removed, requires_base=True
        )
        return LedgerResetAnswers(replicas=[reset])

    async def describe() -> DeploymentView:
        return DeploymentView.from_statuses([ReplicaStatus.model_validate(redacted_status())])

    app.include_router(build_control_plane_router(ControlPlane(served=served, describe=describe)))
    app.include_router(build_openai_router(replica, admission, private_paths=private_paths))
    return app
