"""Jobs: read one (optionally long-polling until it finishes) or follow its events as Server-Sent Events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import redis.asyncio
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.contract import TERMINAL_JOB_STATES
from service.deps import AsyncRedisDep, RecordsDep, SettingsDep, TenantDep
from service.errors import APIError, not_found, responses
from service.records import Records, decode_events
from service.schemas import JobPublic

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

SSE_KEEPALIVE_S = 15.0
WAKING_EVENTS = frozenset({"status", "done"})  # events after which the job record may have changed state
STREAM_ID_PATTERN = r"^\d{1,20}-\d{1,20}$"
MAX_STREAM_ID_PART = 2**64 - 1  # a Redis stream id is two unsigned 64-bit integers
KEEP_ALIVE = "keep-alive"  # the kind `follow_events` gives a quiet interval


@router.get("/{job_id}", response_model=JobPublic, responses=responses(401, 404, 422))
async def get_job(
    job_id: str,
    settings: SettingsDep,
    records: RecordsDep,
    aredis: AsyncRedisDep,
    tenant: TenantDep,
    wait: Annotated[float, Query(ge=0, description="Long-poll: wait up to this many seconds "
                                 "(capped at VIDEOQA_LONG_POLL_MAX_SECONDS) for the job to finish.")] = 0,
) -> JobPublic:  # fmt: skip
    """A job: status, answer, cache facts, timings, evidence; with `wait`, returns as soon as it finishes."""
    job = await finished_job(records, aredis, job_id, tenant, min(wait, settings.long_poll_max_seconds))
    if job is None:
        raise not_found("job")
    return JobPublic.from_record(job)


async def finished_job(
    records: Records, aredis: redis.asyncio.Redis, job_id: str, tenant: str, wait: float
) -> dict | None:
    """The job's record as soon as it finishes, or after `wait` seconds as it is then; None when the tenant
    has no such job (or it was deleted meanwhile)."""
    stream = records.keys.job_events(job_id)
    # The stream position BEFORE reading the record: a state change after the read is an event after it.
    after = await _last_event_id(aredis, stream) if wait > 0 else "0-0"
    job = await run_in_threadpool(records.get_job, job_id, tenant)
    deadline = time.monotonic() + wait
    while job is not None and job["status"] not in TERMINAL_JOB_STATES:
        if (remaining := deadline - time.monotonic()) <= 0:
            break
        # XREAD BLOCK on redis.asyncio: waiting holds a connection, never a thread or the event loop.
        events = decode_events(
            await aredis.xread({stream: after}, block=max(1, int(remaining * 1000)), count=100)
        )
        if events:
            after = events[-1][0]
            if not WAKING_EVENTS.intersection(kind for _, kind, _ in events):
                continue
        job = await run_in_threadpool(records.get_job, job_id, tenant)
        if not events:
            break  # timed out
    return job


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {
            "description": "`event: status|progress|token|done`, `data: <json>`, `id: <stream id>`; "
            "ends after `done` (or an `error` event when the job store goes away). Reconnect with "
            "Last-Event-ID to resume.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **responses(401, 404, 422),
    },
)
async def job_events(
    job_id: str,
    records: RecordsDep,
    aredis: AsyncRedisDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header(pattern=STREAM_ID_PATTERN)] = None,
) -> StreamingResponse:
    """Follow a job as Server-Sent Events: status changes, progress, answer tokens, then done."""
    if last_event_id is not None and any(int(part) > MAX_STREAM_ID_PART for part in last_event_id.split("-")):
        raise APIError(422, "validation_error", "Last-Event-ID: both parts must be below 2**64")
    job = await run_in_threadpool(records.get_job, job_id, tenant)
    if job is None:
        raise not_found("job")
    return StreamingResponse(
        _event_stream(records, aredis, job_id, tenant, last_event_id or "0-0"),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(
    records: Records, aredis: redis.asyncio.Redis, job_id: str, tenant: str, after: str
) -> AsyncIterator[str]:
    """The events, ending with an `error` event (code redis_unavailable) when Redis goes away meanwhile: the
    client reconnects with Last-Event-ID and misses nothing."""
    try:
        async for event_id, kind, data in follow_events(records, aredis, job_id, tenant, after):
            if kind == KEEP_ALIVE:
                yield ": keep-alive\n\n"
            else:
                yield (
                    f"id: {event_id}\n" if event_id else ""
                ) + f"event: {kind}\ndata: {json.dumps(data)}\n\n"
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("event stream of %s ended: redis unavailable (%s)", job_id, exc)
        error = {"code": "redis_unavailable", "message": "the job store is unavailable; reconnect later"}
        yield f"event: error\ndata: {json.dumps(error)}\nretry: 5000\n\n"


async def follow_events(
    records: Records, aredis: redis.asyncio.Redis, job_id: str, tenant: str, after: str = "0-0"
) -> AsyncIterator[tuple[str | None, str, dict]]:
    """The job's events after the stream id `after` as (id, kind, data), up to its "done"; (None,
    KEEP_ALIVE, {}) after every quiet SSE_KEEPALIVE_S. A job that finished without a "done" event (its
    worker died, a sweeper failed it) ends with a (None, "done", {"status": ...}) of its record."""
    stream = records.keys.job_events(job_id)
    while True:
        response = await aredis.xread({stream: after}, block=int(SSE_KEEPALIVE_S * 1000), count=100)
        events = decode_events(response)
        for event_id, kind, data in events:
            yield event_id, kind, data
            after = event_id
            if kind == "done":
                return
        if events:
            continue
        job = await run_in_threadpool(records.get_job, job_id, tenant)
        if job is None:
            return  # deleted with its video
        if job["status"] in TERMINAL_JOB_STATES:
            yield None, "done", {"status": job["status"]}
            return
        yield None, KEEP_ALIVE, {}


async def _last_event_id(aredis: redis.asyncio.Redis, stream: str) -> str:
    newest = await aredis.xrevrange(stream, count=1)
    return newest[0][0] if newest else "0-0"
