"""Liveness, readiness and Prometheus metrics (no authentication: for orchestrators and scrapers)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response

from service.deps import MetricsDep, RecordsDep
from service.errors import APIError, responses
from service.schemas import Health

router = APIRouter(tags=["health"])

WORKER_MAX_AGE_S = 30.0


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
def healthz() -> Health:
    """The process is alive (touches nothing else)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=responses(503))
def readyz(records: RecordsDep) -> Health:
    """Ready when Redis answers and at least one worker sent a heartbeat in the last 30 seconds."""
    try:
        records.client.ping()
        workers = records.live_workers(WORKER_MAX_AGE_S)
    except redis.RedisError as exc:
        raise APIError(503, "redis_unavailable", f"redis does not answer: {type(exc).__name__}") from exc
    if not workers:
        raise APIError(503, "no_workers", f"no worker heartbeat in the last {WORKER_MAX_AGE_S:.0f} seconds")
    return Health(status="ready", workers=workers)


@router.get(
    "/metrics",
    response_model=None,
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: request latency, queue depth, jobs by state, cache hits, artifact bytes."""
    return Response(metrics.render(), media_type=metrics.content_type)
