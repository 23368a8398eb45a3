"""A deployment of several replica processes behind one address.

A local gateway's replicas are processes of a `ReplicaPool` (`replica_process`),
which the app stops on shutdown. The gateway app speaks the same HTTP API as a
replica: it fans hot-loads, hints and ledger resets out to every replica (all must accept;
per-replica results are returned), concatenates statuses and ledgers, and
balances inference over the replicas (round robin; a request with an
`x-multi-turn-session-id` sticks to one replica so its prompt cache is reused).

Which replicas there are, and which take traffic, is the `Membership`'s call:
a fixed pool here, or an elastic set (Ray actors) that admits a replica only
once it serves the deployment's head (`elastic_membership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from weightsync import __version__
from weightsync.server.config import ServedDeployment
from weightsync.server.control_plane import (
    ControlPlane,
    DeploymentView,
    build_control_plane_router,
)
from weightsync.server.http_errors import error_response, install_error_handlers
from weightsync.server.membership import Member, Membership, StaticMembership
from weightsync.server.metrics import CONTENT_TYPE_LATEST, HttpMetrics
from weightsync.server.middleware import DeploymentMiddleware, GuardMiddleware, MetricsMiddleware
from weightsync.server.replica_process import ReplicaPool
from weightsync.wire import (
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    CHAT_COMPLETIONS_PATH,
    COMPLETIONS_PATH,
    DEPLOYMENT_HEADER,
    HEALTH_PATH,
    HINT_PATH,
    HOT_LOAD_PATH,
    HOT_LOAD_WAIT_PARAM,
    INFERENCE_CHAT_COMPLETIONS_PATH,
    INFERENCE_COMPLETIONS_PATH,
    INFERENCE_MODELS_PATH,
    LEDGER_PATH,
    LEDGER_RESET_PATH,
    LOADING_STAGES,
    MAX_HOT_LOAD_WAIT_S,
    METRICS_PATH,
    MODEL_HEADER,
    MODELS_PATH,
    NO_WAIT_HEADER,
    SESSION_HEADER,
    WEIGHTS_PATH,
    ErrorBody,
    HintAnswers,
    HotLoadAnswers,
    HotLoadRequest,
    HotLoadStatus,
    LedgerAnswers,
    LedgerResetAnswers,
    LoadingState,
    ReplicaFailure,
    ReplicaStatus,
    WeightsAnswers,
    error_body,
)
from weightsync.wire.inference import split_model

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The answers a gateway fans out and lists, one entry per replica.
FanOutAnswers = HotLoadAnswers | HintAnswers | WeightsAnswers | LedgerAnswers | LedgerResetAnswers

_FORWARDED_HEADERS = (
    AUTHORIZATION_HEADER,
    API_KEY_HEADER,
    "content-type",
    SESSION_HEADER,
    NO_WAIT_HEADER,
    DEPLOYMENT_HEADER,
    MODEL_HEADER,
)
INFERENCE_TIMEOUT_S = 600.0
CONTROL_TIMEOUT_S = 60.0


def _forward_headers(request: Request) -> dict[str, str]:
    return {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}


def create_gateway_app(
    replica_urls: list[str],
    *,
    api_key: str | None,
    max_body_bytes: int,
    pool: ReplicaPool | None = None,
    served: ServedDeployment | None = None,
    membership: Membership | None = None,
) -> FastAPI:
    """The deployment's front app over replicas at `replica_urls` (stops `pool` on shutdown).

    `served` names the account and deployment it answers for (the replicas must
    be started with the same ids: the gateway forwards the deployment headers).
    `membership` replaces the fixed `replica_urls` with a changing set (the
    caller starts and stops it).
    """
    served = served if served is not None else ServedDeployment()
    if membership is None:
        replica_ids = [f"replica-{i}" for i in range(len(replica_urls))]
        if pool is not None:
            replica_ids = [r.replica_id for r in pool.replicas]
        membership = StaticMembership(replica_urls, replica_ids)
    replicas: Membership = membership
    metrics = HttpMetrics(CollectorRegistry())
    round_robin = itertools.count()
    clients: dict[str, httpx.AsyncClient] = {}
    # What the gateway sends on calls of its own (not forwarded from a client).
    own_headers = {AUTHORIZATION_HEADER: f"Bearer {api_key}"} if api_key else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients["c"] = httpx.AsyncClient(timeout=CONTROL_TIMEOUT_S)
        try:
            yield
        finally:
            await clients["c"].aclose()
            if pool is not None:
                logger.info("gateway shutting down; stopping %d replicas", len(pool.replicas))
                await asyncio.to_thread(pool.stop)

    app = FastAPI(title="weightsync gateway", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    # Added first, so it runs inside the guard: a wrong key gets 401 before any 404.
    app.add_middleware(DeploymentMiddleware, served=served)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    async def call(
        member: Member,
        method: str,
        path: str,
        request: Request | None,
        *,
        body: bytes | None = None,
        timeout_s: float = CONTROL_TIMEOUT_S,
        lost: set[str] | None = None,
    ) -> tuple[int, Any]:
        """One replica's answer; an unreachable one is a 503 (and joins `lost`)."""
        headers = _forward_headers(request) if request is not None else own_headers
        try:
            r = await clients["c"].request(
                method, f"{member.url}{path}", content=body, headers=headers, timeout=timeout_s
            )
        except httpx.HTTPError as e:
            if lost is not None:
                lost.add(member.replica_id)
            message = f"{member.replica_id} at {member.url} is unreachable: {e!r}"
            return 503, error_body(503, message, "DeploymentError")
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, error_body(r.status_code, r.text, "HTTPError")

    async def fan_out(
        method: str,
        path: str,
        request: Request | None,
        body: bytes | None = None,
        *,
        members: list[Member] | None = None,
        lost: set[str] | None = None,
    ) -> tuple[list[Member], list[tuple[int, Any]]]:
        """Every reachable replica's answer (`members`, default: all that answer)."""
        if members is None:
            members = [m for m in replicas.members() if m.url is not None]
        calls = (call(m, method, path, request, body=body, lost=lost) for m in members)
        return members, list(await asyncio.gather(*calls))

    def merged(
        fanned: tuple[list[Member], list[tuple[int, Any]]],
        answers: type[FanOutAnswers],
        extra: dict[str, Any] | None = None,
    ) -> JSONResponse:
        """Every replica's entries, parsed as `answers`; the first failure's status if any failed.

        A replica's answer that is not its wire model counts as a failure (502).
        """
        members, results = fanned
        entries: list[Any] = []
        failures = []
        for member, (answered, doc) in zip(members, results, strict=True):
            status, message = answered, ""
            if 200 <= answered < 300:
                try:
                    parsed = answers.model_validate(doc)
                    entries.extend(r.model_dump(mode="json") for r in parsed.replicas)
                    continue
                except ValidationError as e:
                    status, message = 502, f"answered outside the wire contract: {e}"
            message = message or _error_message(doc)
            failures.append((status, f"{member.replica_id}: {message}"))
            failure = ReplicaFailure(
                replica_id=member.replica_id, status_code=status, error=message
            )
            entries.append(failure.model_dump(mode="json"))
        if not failures:
            return JSONResponse({"replicas": entries, **(extra or {})})
        status = failures[0][0]
        message = "; ".join(m for _, m in failures)
        body = {**error_body(status, message, "ReplicaError"), "replicas": entries}
        return JSONResponse({**body, **(extra or {})}, status_code=status)

    async def statuses(request: Request | None, wait_s: float = 0.0) -> list[ReplicaStatus]:
        """Every replica's status; one that cannot answer, or is missing, is reported not ready.

        `wait_s` is passed on: each replica answers once its own load ends.
        """
        members = replicas.members()
        path = HOT_LOAD_PATH + (f"?{HOT_LOAD_WAIT_PARAM}={wait_s:g}" if wait_s > 0 else "")
        reachable, results = await fan_out(
            "GET", path, request, members=[m for m in members if m.url is not None]
        )
        answered = {m.replica_id: result for m, result in zip(reachable, results, strict=True)}
        entries: list[ReplicaStatus] = []
        for member in members:
            status, doc = answered.get(member.replica_id, (503, member.problem or "missing"))
            if 200 <= status < 300:
                for entry in HotLoadStatus.model_validate(doc).replicas:
                    update: dict[str, Any] = {"url": member.url, "membership": member.state}
                    if member.problem is not None and entry.degraded is None:
                        update["degraded"] = member.problem  # e.g. a refused catch-up load
                    entries.append(entry.model_copy(update=update))
                continue
            entries.append(
                ReplicaStatus(
                    replica_id=member.replica_id,
                    url=member.url,
                    current_snapshot_identity=None,
                    readiness=False,
                    loading_state=LoadingState(
                        stage="error", target_snapshot_identity=None, error=_error_message(doc)
                    ),
                    membership=member.state,
                )
            )
        return entries

    @app.get(HEALTH_PATH)
    async def health() -> dict[str, Any]:
        members = replicas.members()
        alive = pool.alive() if pool is not None else len(replicas.serving())
        return {"status": "ok", "replicas_alive": alive, "replicas": len(members)}

    @app.get(METRICS_PATH)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post(HOT_LOAD_PATH)
    async def hot_load(request: Request) -> JSONResponse:
        body = await request.body()
        lost: set[str] = set()
        async with replicas.hot_load_round() as targets:
            if not targets:
                message = (
                    "no replica serves the deployment's head yet; GET the hot-load status to "
                    "see each replica's standing, and retry"
                )
                return error_response(503, message, "DeploymentError")
            members, results = await fan_out(
                "POST", HOT_LOAD_PATH, request, body=body, members=targets, lost=lost
            )
            if any(200 <= s < 300 for s, _ in results):
                # A replica accepted: the request was valid JSON of the contract.
                document = json.loads(body)
                await asyncio.to_thread(
                    replicas.accepted, HotLoadRequest.model_validate(document), document
                )
            if lost:
                replicas.lost(lost)
        view = replicas.view()
        if view is not None and lost:
            # Replicas gone mid-round are not counted: the view says they are missing.
            kept = [
                (m, r) for m, r in zip(members, results, strict=True) if m.replica_id not in lost
            ]
            members, results = [m for m, _ in kept], [r for _, r in kept]
        # Each replica answers with its own HotLoadAnswer; the gateway lists them.
        wrapped = [(s, {"replicas": [d]} if 200 <= s < 300 else d) for s, d in results]
        extra = {"membership": view.model_dump(mode="json")} if view is not None else None
        return merged((members, wrapped), HotLoadAnswers, extra)

    @app.get(HOT_LOAD_PATH)
    async def hot_load_status(
        request: Request,
        wait_s: float = Query(default=0.0, alias=HOT_LOAD_WAIT_PARAM, ge=0, le=MAX_HOT_LOAD_WAIT_S),
    ) -> HotLoadStatus:
        # Status stays readable when a replica is down: that one is reported as not ready.
        return HotLoadStatus(replicas=await statuses(request, wait_s))

    @app.post(HINT_PATH)
    async def hint(request: Request) -> JSONResponse:
        results = await fan_out("POST", HINT_PATH, request, body=await request.body())
        return merged(results, HintAnswers)

    @app.get(WEIGHTS_PATH)
    async def weights(request: Request) -> JSONResponse:
        query = f"?{request.url.query}" if request.url.query else ""
        return merged(await fan_out("GET", WEIGHTS_PATH + query, request), WeightsAnswers)

    @app.get(LEDGER_PATH)
    async def ledger(request: Request) -> JSONResponse:
        return merged(await fan_out("GET", LEDGER_PATH, request), LedgerAnswers)

    @app.post(LEDGER_RESET_PATH)
    async def ledger_reset(request: Request) -> JSONResponse:
        return merged(await fan_out("POST", LEDGER_RESET_PATH, request), LedgerResetAnswers)

    async def adapter_holders(adapter: str, serving: list[Member]) -> list[Member] | JSONResponse:
        """The serving replicas that hold LoRA adapter `adapter`: as last polled, else as they
        answer now (a load that just ended may not be polled yet); else a 425 while one still
        loads it, a 404 when none has it (a replica without it would answer with the base)."""
        held = replicas.holding(adapter)
        if held:
            return held
        members, results = await fan_out("GET", HOT_LOAD_PATH, None, members=serving)
        held, loading = [], []
        for member, (status, doc) in zip(members, results, strict=True):
            try:
                entries = HotLoadStatus.model_validate(doc).replicas if status == 200 else []
            except ValidationError:
                entries = []  # not the contract's answer: not a holder
            for entry in entries:
                state = entry.loading_state
                if adapter in entry.adapter_identities():
                    held.append(member)
                elif state.stage in LOADING_STAGES and state.target_snapshot_identity == adapter:
                    loading.append(member.replica_id)
        if held:
            return held
        if loading:
            message = (
                f"LoRA adapter {adapter!r} is still loading on {', '.join(loading)}, and no "
                "replica serving the deployment holds it yet; wait until the hot-load status "
                "lists it loaded, then retry"
            )
            response = error_response(425, message, "SwapInProgressError")
            response.headers["retry-after"] = "1"
            return response
        message = (
            f"LoRA adapter {adapter!r} is loaded on no replica serving the deployment (each "
            "unloaded it past --max-adapters, its load failed, or they joined after the "
            f"deployment dropped it); hot-load it again (POST {HOT_LOAD_PATH} with identity "
            f"{adapter!r}), wait until the status lists it loaded, then retry"
        )
        return error_response(404, message, "SnapshotNotFoundError")

    async def proxy_inference(request: Request) -> Response:
        """Forward to one replica (sticky per session) and pass its answer back as it comes.

        A request whose `model` names a LoRA adapter of the deployment goes only to the
        replicas that hold it (`adapter_holders`). A replica that is unreachable, not serving
        yet (503), whose queue is full (429) or that unloaded the named adapter since (404) is
        skipped for the next. An SSE stream is relayed chunk by chunk. The client going away
        closes the replica's connection, which stops the generation.
        """
        body = await request.body()
        serving = replicas.serving()
        if not serving:
            message = "no replica serves the deployment's head yet; retry shortly"
            return JSONResponse(error_body(503, message, "DeploymentError"), status_code=503)
        skip: tuple[int, ...] = (429, 503)
        adapter = _named_adapter(body, replicas.adapters())
        if adapter is not None:
            routed = await adapter_holders(adapter, serving)
            if isinstance(routed, JSONResponse):
                return routed
            serving, skip = routed, (404, 429, 503)
        session = request.headers.get(SESSION_HEADER)
        first = zlib.crc32(session.encode()) if session else next(round_robin)
        order = [serving[(first + k) % len(serving)] for k in range(len(serving))]
        upstream: httpx.Response | None = None
        failure = error_body(503, "no replica answered", "DeploymentError")
        for k, member in enumerate(order):
            outgoing = clients["c"].build_request(
                "POST",
                f"{member.url}{request.url.path}",
                content=body,
                headers=_forward_headers(request),
                timeout=INFERENCE_TIMEOUT_S,
            )
            try:
                upstream = await _unless_disconnected(
                    request, clients["c"].send(outgoing, stream=True)
                )
            except httpx.HTTPError as e:
                message = f"{member.replica_id} at {member.url} is unreachable: {e!r}"
                failure = error_body(503, message, "DeploymentError")
                continue
            if upstream is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            if upstream.status_code in skip and k < len(order) - 1:
                await upstream.aclose()
                upstream = None
                continue
            break
        if upstream is None:
            return JSONResponse(failure, status_code=503)
        headers = {
            h: v
            for h, v in upstream.headers.items()
            if h in ("content-type", "retry-after") or h.startswith("fireworks-")
        }
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            relayed = upstream

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in relayed.aiter_raw():
                        yield chunk
                finally:
                    await relayed.aclose()

            return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers)
        try:
            content = await _unless_disconnected(request, upstream.aread())
        finally:
            await upstream.aclose()
        return Response(content or b"", status_code=upstream.status_code, headers=headers)

    for path in (
        COMPLETIONS_PATH,
        CHAT_COMPLETIONS_PATH,
        INFERENCE_COMPLETIONS_PATH,
        INFERENCE_CHAT_COMPLETIONS_PATH,
    ):
        app.add_api_route(path, proxy_inference, methods=["POST"], response_model=None)

    async def models(request: Request) -> JSONResponse:
        serving = replicas.serving()
        if not serving:
            return error_response(503, "no replica serves the deployment yet", "DeploymentError")
        status, doc = await call(serving[0], "GET", MODELS_PATH, request)
        if not 200 <= status < 300:
            return error_response(status, str(doc), "ReplicaError")
        return JSONResponse(doc)

    for path in (MODELS_PATH, INFERENCE_MODELS_PATH):
        app.add_api_route(path, models, methods=["GET"])

    async def describe() -> DeploymentView:
        # No request to forward headers from: the gateway's own key reaches the replicas.
        return DeploymentView.from_statuses(await statuses(None))

    app.include_router(build_control_plane_router(ControlPlane(served=served, describe=describe)))
    return app


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`await work`, or cancel it and return None when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _named_adapter(body: bytes, adapters: frozenset[str]) -> str | None:
    """The adapter among `adapters` that an inference request's `model` names, or None (the
    body is parsed only when there are adapters; a malformed one is the replica's to refuse)."""
    if not adapters:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str):
        return None
    _, served = split_model(model)
    return served if served in adapters else None


def _error_message(doc: Any) -> str:
    """The message of a replica's error body (or the body itself when it is not one)."""
    try:
        return ErrorBody.model_validate(doc).error.message
    except ValidationError:
        return str(doc)
