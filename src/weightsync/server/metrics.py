"""Prometheus metrics, one registry per app (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

__all__ = ["CONTENT_TYPE_LATEST", "HttpMetrics", "ReplicaMetrics"]


class HttpMetrics:
    """Request counts and latency by route template and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "weightsync_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "weightsync_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaMetrics(HttpMetrics):
    """Hot-load and generation metrics of one replica."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.loads = Counter(
            "weightsync_hotloads",
            "Hot-loads by kind and result",
            ["kind", "result"],
            registry=registry,
        )
        self.bytes_fetched = Counter(
            "weightsync_hotload_fetched_bytes", "Snapshot payload bytes fetched", registry=registry
        )
        self.pause = Histogram(
            "weightsync_hotload_pause_seconds",
            "Serving pause per hot-load (exclusive swap lock held: apply + cache reset)",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "weightsync_hotload_stage_seconds",
            "Seconds per hot-load stage",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.verify_failures = Counter(
            "weightsync_verify_failures",
            "Loads refused because a checksum did not match the manifest",
            registry=registry,
        )
        self.ready = Gauge(
            "weightsync_replica_ready",
            "1 when the replica serves a verified snapshot",
            registry=registry,
        )
        self.generated_tokens = Counter(
            "weightsync_generated_tokens", "Tokens generated", registry=registry
        )
        self.cache_entries_dropped = Counter(
            "weightsync_prompt_cache_entries_dropped",
            "Prompt-cache entries dropped by hot-loads",
            registry=registry,
        )
