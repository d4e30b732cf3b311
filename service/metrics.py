"""Prometheus metrics: request latency by route template, and gauges read from Redis at scrape time.

Each app owns its CollectorRegistry (no process-global state: tests build many apps). The Redis-backed
families cost one pipeline per scrape: the queue lists' lengths and a few counter hashes that Records keeps
up to date, never a scan over records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.queue import TaskQueue
from service.records import Records
from service.routing import REASONS

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The app's registry and its HTTP metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, records: Records) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "videoqa_http_request_duration_seconds", "HTTP request latency (streams: until they end).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "videoqa_http_requests", "HTTP requests by route template, method and status.",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(RedisCollector(records))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RedisCollector(Collector):
    """Queue depth, jobs and videos by state, cache hits/misses by tier, artifact bytes, live workers."""

    def __init__(self, records: Records) -> None:
        self.records = records

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("videoqa_redis_up", "Whether Redis answered this scrape.")
        try:
            depth = TaskQueue.depth(self.records.client, self.records.keys)
            counters = {name: self.records.counters(name) for name in _COUNTERS}
            workers = len(self.records.live_workers())
        except redis.RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("videoqa_queue_depth", "Tasks waiting in the GPU queue.", value=depth)
        yield GaugeMetricFamily("videoqa_workers_live", "Workers with a recent heartbeat.", value=workers)
        yield _by_label("videoqa_jobs", "Jobs by state.", "state", counters["jobs"])
        yield _by_label("videoqa_videos", "Videos by status.", "status", counters["videos"])
        yield _cache_lookups(counters["cache"])
        lookups = sum(n for field, n in counters["cache"].items() if field.startswith(("hit:", "miss:")))
        yield GaugeMetricFamily(
            "videoqa_memory_tier_hit_ratio",
            "Cache lookups answered from a worker's memory tier, of all.",
            value=counters["cache"].get("hit:memory", 0) / lookups if lookups else 0.0,
        )
        routes = CounterMetricFamily(
            "videoqa_routing_decisions", "Asks routed, by why their queue was chosen.", labels=["reason"]
        )
        for reason in REASONS:
            routes.add_metric([reason], counters["routing"].get(reason, 0))
        yield routes
        yield _by_label("videoqa_artifact_bytes", "Compressed artifact bytes by tier.", "tier",
                        counters["artifact_bytes"])  # fmt: skip
        yield _by_label(
            "videoqa_engine_events", "Engine events (compressions, ...).", "event", counters["engine"]
        )


# The Records counter hashes read at each scrape (see service.records and worker/serving/tasks.py).
_COUNTERS = ("jobs", "videos", "cache", "artifact_bytes", "engine", "routing")


def _cache_lookups(cache: dict[str, float]) -> CounterMetricFamily:
    """Workers count "hit:<tier>" and "miss:<reason>" in the "cache" counter; a miss's tier is none."""
    family = CounterMetricFamily("videoqa_cache_requests", "Cache lookups by result, tier and miss reason.",
                                 labels=["result", "tier", "reason"])  # fmt: skip
    for field, value in sorted(cache.items()):
        result, _, detail = field.partition(":")
        if result == "hit":
            family.add_metric(["hit", detail, ""], value)
        elif result == "miss":
            family.add_metric(["miss", "none", detail], value)
    return family


def _by_label(name: str, documentation: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class MetricsMiddleware:
    """Pure ASGI (unlike BaseHTTPMiddleware it does not buffer streaming responses such as SSE)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template, not the path: ids must not become label values.
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
