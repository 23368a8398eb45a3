"""What inference may cost a replica: a bounded queue, a token budget, cancellation.

Inference runs on its own executor (`workers` threads), never on the threads
that answer `/health`, the hot-load status or the ledger, so a flood of
completions cannot starve them. At most `workers + max_queued` requests are
admitted at once; one more is answered 429 with `Retry-After`. A request whose
sequences could generate more than `max_request_tokens` tokens in total is
refused (400) before it queues. A request whose client goes away is cancelled:
its next decoding step raises, so a generation stops within one step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import Receive

from weightsync.errors import InvalidInputError, OverloadedError, RequestCancelledError
from weightsync.server.engines.base import StepGuard

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_INFERENCE_WORKERS = 16
DEFAULT_MAX_QUEUED_REQUESTS = 256
DEFAULT_MAX_REQUEST_TOKENS = 1 << 20
#: What a 429 asks the client to wait before retrying.
RETRY_AFTER_S = 1


@dataclass(frozen=True, kw_only=True)
class InferenceLimits:
    """The bounds of one replica's inference (validated; see the module docstring)."""

    workers: int = DEFAULT_INFERENCE_WORKERS
    max_queued: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InvalidInputError(f"inference workers must be >= 1, got {self.workers}")
        if self.max_queued < 0:
            raise InvalidInputError(f"max queued requests must be >= 0, got {self.max_queued}")
        if self.max_request_tokens < 1:
            raise InvalidInputError(
                f"max request tokens must be >= 1, got {self.max_request_tokens}"
            )


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge(
            "weightsync_inference_running",
            "Inference requests generating now",
            registry=registry,
        )
        self.queued = Gauge(
            "weightsync_inference_queued",
            "Inference requests admitted and waiting for a worker",
            registry=registry,
        )
        self.refused = Counter(
            "weightsync_inference_refused",
            "Inference requests refused before they ran, by reason",
            ["reason"],
            registry=registry,
        )
        self.cancelled = Counter(
            "weightsync_inference_cancelled",
            "Inference requests stopped because their client went away",
            registry=registry,
        )


class InferenceAdmission:
    """The executor, queue bound and token budget of one replica's inference."""

    def __init__(self, limits: InferenceLimits, registry: CollectorRegistry) -> None:
        self.limits = limits
        self._executor = ThreadPoolExecutor(
            max_workers=limits.workers, thread_name_prefix="inference"
        )
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self.metrics = _Metrics(registry)

    # --- before a request queues ----------------------------------------------

    def check_budget(
        self, *, num_prompts: int, n: int, max_tokens: int, max_positions: int | None
    ) -> None:
        """Refuse a request whose sequences could generate more than the budget in total.

        `max_tokens` counts as at most the model's context (`max_positions`), the
        most a sequence can really produce.
        """
        per_sequence = max_tokens if max_positions is None else min(max_tokens, max_positions)
        total = num_prompts * n * per_sequence
        limit = self.limits.max_request_tokens
        if total <= limit:
            return
        self.metrics.refused.labels(reason="token_budget").inc()
        per_prompt = n * per_sequence
        if per_prompt <= limit:
            how = (
                f"split it into requests of at most {limit // per_prompt} prompts each, "
                "or lower n or max_tokens"
            )
        else:
            how = f"lower max_tokens to at most {max(1, limit // n)} (or n)"
        raise InvalidInputError(
            f"this request may generate up to {total} tokens ({num_prompts} prompts x n {n} x "
            f"max_tokens {per_sequence}); the limit per request is {limit} tokens: {how}"
        )

    def admit(self) -> Ticket:
        """Take a place in the queue, or raise `OverloadedError` (429) when it is full."""
        capacity = self.limits.workers + self.limits.max_queued
        with self._lock:
            if self._admitted >= capacity:
                self.metrics.refused.labels(reason="queue_full").inc()
                raise OverloadedError(
                    f"the replica's inference queue is full ({self._admitted} requests admitted, "
                    f"limit {capacity}); retry after {RETRY_AFTER_S} s or send fewer requests "
                    "at once",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._admitted += 1
            self._update_gauges()
        return Ticket(self)

    @property
    def running(self) -> int:
        """Requests on a worker now."""
        return self._running

    # --- running ------------------------------------------------------------------

    def run(self, ticket: Ticket, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run `work` on an inference worker; the ticket is released when it ends."""

        def job() -> T:
            with self._lock:
                self._running += 1
                self._update_gauges()
            try:
                return work()
            except RequestCancelledError:
                self.metrics.cancelled.inc()
                raise
            finally:
                with self._lock:
                    self._running -= 1
                ticket.release()

        try:
            submitted = self._executor.submit(job)
        except RuntimeError:  # the executor shut down: the replica is closing
            ticket.release()
            raise
        # A request cancelled while still queued never runs `job`: release its place here.
        submitted.add_done_callback(lambda f: ticket.release() if f.cancelled() else None)
        return asyncio.wrap_future(submitted)

    def _update_gauges(self) -> None:
        self.metrics.running.set(self._running)
        self.metrics.queued.set(max(0, self._admitted - self._running))

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
            self._update_gauges()

    def close(self) -> None:
        """Stop taking work; running generations finish (their clients are gone at shutdown)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class Ticket:
    """One admitted request's place; released exactly once."""

    def __init__(self, owner: InferenceAdmission) -> None:
        self._owner = owner
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._owner._release()


def cancellable(step_guard: StepGuard, cancel: threading.Event) -> StepGuard:
    """`step_guard` that raises `RequestCancelledError` before a step once `cancel` is set."""

    @contextmanager
    def guarded() -> Iterator[str]:
        if cancel.is_set():
            raise RequestCancelledError(
                "the client closed the connection; the generation was stopped"
            )
        with step_guard() as identity:
            yield identity

    def guard() -> AbstractContextManager[str]:
        return guarded()

    return guard


async def watch_disconnect(receive: Receive, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects (run as a task once the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
