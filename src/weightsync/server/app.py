"""The FastAPI app of one replica: hot-load API, ledger, inference, health, metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from weightsync import __version__
from weightsync.codec import DEFAULT_CHECKSUM
from weightsync.server.http_errors import install_error_handlers
from weightsync.server.metrics import CONTENT_TYPE_LATEST
from weightsync.server.middleware import GuardMiddleware, MetricsMiddleware
from weightsync.server.openai_api import build_openai_router
from weightsync.server.replica import Replica
from weightsync.server.schemas import HintRequest, HotLoadRequest

logger = logging.getLogger(__name__)

HOT_LOAD_PATH = "/hot_load/v1/models/hot_load"
HINT_PATH = "/hot_load/v1/models/hot_load/hint"
LEDGER_PATH = "/hot_load/v1/ledger"
LEDGER_RESET_PATH = "/hot_load/v1/ledger/reset"
WEIGHTS_PATH = "/hot_load/v1/weights"


def create_app(replica: Replica, *, close_replica_on_shutdown: bool = True) -> FastAPI:
    """The HTTP app of one started replica (`Replica.start()` already ran)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_replica_on_shutdown:
            logger.info("replica %s shutting down", replica.config.replica_id)
            await run_in_threadpool(replica.close)

    app = FastAPI(title="weightsync replica", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        api_key=replica.config.api_key,
        max_body_bytes=replica.config.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=replica.metrics)
    app.state.replica = replica

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness only: the process answers. Readiness is in the hot-load status."""
        return {"status": "ok", "replica_id": replica.config.replica_id}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(replica.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(HOT_LOAD_PATH)
    def hot_load(body: HotLoadRequest) -> dict[str, Any]:
        return replica.request_hot_load(body)

    @app.get(HOT_LOAD_PATH)
    def hot_load_status() -> dict[str, Any]:
        return {"replicas": [replica.status()]}

    @app.post(HINT_PATH)
    def hot_load_hint(body: HintRequest) -> dict[str, Any]:
        return {"replicas": [replica.hint(body)]}

    @app.get(WEIGHTS_PATH)
    def weights(checksum_format: str = DEFAULT_CHECKSUM) -> dict[str, Any]:
        """Checksums of the live weights, computed now: proof of what the replica serves."""
        return {"replicas": [replica.weights_checksums(checksum_format)]}

    @app.get(LEDGER_PATH)
    def ledger() -> dict[str, Any]:
        return {
            "replicas": [
                {"replica_id": replica.config.replica_id, "entries": replica.ledger_entries()}
            ]
        }

    @app.post(LEDGER_RESET_PATH)
    def ledger_reset() -> dict[str, Any]:
        removed = replica.reset_ledger()
        return {
            "replicas": [
                {
                    "replica_id": replica.config.replica_id,
                    "removed_entries": removed,
                    "requires_base": True,
                }
            ]
        }

    app.include_router(build_openai_router(replica))
    return app
