"""OpenAI-compatible inference: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Also under `/inference/v1/...` (where the Fireworks SDK sends them). Streaming
(`stream: true`) answers Server-Sent Events, `data: {chunk}` per step then
`data: [DONE]`. Every response names the snapshot that produced it: `model` is
`"<model_name>@<identity>"`; `snapshot_identity` is the identity of the last
generated token and `snapshot_identities` every identity in token order (more
than one only when an `async` transition swapped weights mid-generation; each
choice then lists `snapshot_changes` with the token index where it changed). A
stream chunk's `model` names the weights of that chunk's own tokens.

Inference runs on the replica's inference executor behind a bounded queue and a
token budget, and stops when the client goes away (`inference_admission`).
Errors found before the first token are HTTP errors; one after the stream began
is an `event: error` SSE event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from weightsync.errors import WeightSyncError
from weightsync.server.completions import Generator, Plan, RequestTiming
from weightsync.server.http_errors import PrivatePaths, redact_paths, status_for
from weightsync.server.inference_admission import (
    InferenceAdmission,
    Ticket,
    watch_disconnect,
)
from weightsync.server.replica import Replica
from weightsync.wire.inference import (
    DEFAULT_MAX_TOKENS,
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    PerfMetrics,
    StreamError,
    StreamErrorEvent,
    sse_error,
)
from weightsync.wire.paths import (
    CHAT_COMPLETIONS_PATH,
    COMPLETIONS_PATH,
    INFERENCE_CHAT_COMPLETIONS_PATH,
    INFERENCE_COMPLETIONS_PATH,
    INFERENCE_MODELS_PATH,
    MODELS_PATH,
)

logger = logging.getLogger(__name__)

__all__ = ["build_openai_router"]


def _truthy(header: str | None) -> bool:
    return header is not None and header.strip().lower() in ("1", "true", "yes")


def _perf_headers(perf: PerfMetrics) -> dict[str, str]:
    """The server metrics as the `fireworks-*` response headers the SDK reads."""
    return {
        f"fireworks-{k}": f"{v:.6f}" if isinstance(v, float) else str(v) for k, v in perf.items()
    }


def _num_prompts(req: CompletionRequest | ChatCompletionRequest) -> int:
    if isinstance(req, ChatCompletionRequest):
        return 1
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return 1
    return max(1, len(prompt))


# --- the routes ---------------------------------------------------------------------


class _Serving:
    """One request's trip: budget, queue place, worker, disconnect watch, response."""

    def __init__(
        self, gen: Generator, admission: InferenceAdmission, private_paths: PrivatePaths
    ) -> None:
        self.gen = gen
        self.admission = admission
        self.private_paths = private_paths

    async def handle(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        plan_fn: Callable[[], Plan],
    ) -> Response:
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        self.admission.check_budget(
            num_prompts=_num_prompts(body),
            n=body.n,
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            max_positions=self.gen.replica.model_config.get("max_position_embeddings"),
        )
        arrived = time.perf_counter()
        ticket = self.admission.admit()
        cancel = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request.receive, cancel))

        def planned() -> Plan:
            plan = plan_fn()
            started = time.perf_counter()
            plan.timing = RequestTiming(
                arrived=arrived, started=started, concurrent=self.admission.running
            )
            return plan

        if not body.stream:
            try:

                def work() -> tuple[dict[str, Any], PerfMetrics]:
                    plan = planned()
                    sequences, started_on = self.gen.run(plan, cancel)
                    answer = self.gen.response(plan, sequences, started_on)
                    assert plan.timing is not None
                    return answer.model_dump(mode="json"), plan.timing.perf_metrics(sequences)

                answer, perf = await self.admission.run(ticket, work)
            finally:
                watcher.cancel()
            return JSONResponse(answer, headers=_perf_headers(perf))
        return await self._stream(ticket, planned, cancel, watcher)

    async def _stream(
        self,
        ticket: Ticket,
        plan_fn: Callable[[], Plan],
        cancel: threading.Event,
        watcher: asyncio.Task[None],
    ) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[bytes | None] = asyncio.Queue()

        def emit(data: bytes) -> None:
            loop.call_soon_threadsafe(events.put_nowait, data)

        started: list[Plan] = []

        def work() -> None:
            plan = plan_fn()
            started.append(plan)
            self.gen.run(plan, cancel, emit)

        done = self.admission.run(ticket, work)
        done.add_done_callback(lambda _: events.put_nowait(None))
        # Wait for the request to start (or fail) before answering: an error found
        # before the first token is an HTTP error, not an event inside a 200 stream.
        first = await events.get()
        if first is None:
            watcher.cancel()
            done.result()  # raises: the app's error handlers answer it
            raise AssertionError("a stream that never started ended without an error")

        async def body() -> AsyncIterator[bytes]:
            try:
                while (data := await events.get()) is not None:
                    if data:
                        yield data
                exc = done.exception()
                if exc is None:
                    yield SSE_DONE
                elif isinstance(exc, WeightSyncError) and not cancel.is_set():
                    status = status_for(exc)
                    yield sse_error(
                        StreamErrorEvent(
                            error=StreamError(
                                message=redact_paths(str(exc), self.private_paths),
                                type=type(exc).__name__,
                                code=status,
                                status_code=status,
                            )
                        )
                    )
                elif not cancel.is_set():
                    logger.error("streaming inference failed", exc_info=exc)
                    yield sse_error(
                        StreamErrorEvent(
                            error=StreamError(
                                message=redact_paths(
                                    f"internal error: {exc!r}", self.private_paths
                                ),
                                type=type(exc).__name__,
                                code=500,
                                status_code=500,
                            )
                        )
                    )
            finally:
                # The client may be gone (Starlette closes this generator): stop the work.
                cancel.set()
                watcher.cancel()

        timing = started[0].timing if started else None
        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={
                "cache-control": "no-cache",
                "x-accel-buffering": "no",
                **(_perf_headers(timing.perf_metrics()) if timing is not None else {}),
            },
        )


def build_openai_router(
    replica: Replica, admission: InferenceAdmission, *, private_paths: PrivatePaths | None = None
) -> APIRouter:
    """Routes of the inference API (async handlers; the work runs on `admission`'s executor).

    `private_paths` are redacted from errors sent inside a stream (as the app's
    error handlers redact them from error answers).
    """
    router = APIRouter()
    gen = Generator(replica)
    serving = _Serving(gen, admission, private_paths or {})

    async def completions(
        request: Request,
        body: CompletionRequest,
        x_multi_turn_session_id: str | None = Header(default=None),
        x_weightsync_no_wait: str | None = Header(default=None),
    ) -> Response:
        no_wait = _truthy(x_weightsync_no_wait)
        return await serving.handle(
            request,
            body,
            lambda: gen.plan_completion(body, session=x_multi_turn_session_id, no_wait=no_wait),
        )

    async def chat_completions(
        request: Request,
        body: ChatCompletionRequest,
        x_multi_turn_session_id: str | None = Header(default=None),
        x_weightsync_no_wait: str | None = Header(default=None),
    ) -> Response:
        no_wait = _truthy(x_weightsync_no_wait)
        return await serving.handle(
            request,
            body,
            lambda: gen.plan_chat(body, session=x_multi_turn_session_id, no_wait=no_wait),
        )

    async def models() -> dict[str, Any]:
        return gen.models().model_dump(mode="json")

    for path in (COMPLETIONS_PATH, INFERENCE_COMPLETIONS_PATH):
        router.add_api_route(path, completions, methods=["POST"], response_model=None)
    for path in (CHAT_COMPLETIONS_PATH, INFERENCE_CHAT_COMPLETIONS_PATH):
        router.add_api_route(path, chat_completions, methods=["POST"], response_model=None)
    for path in (MODELS_PATH, INFERENCE_MODELS_PATH):
        router.add_api_route(path, models, methods=["GET"])
    return router
