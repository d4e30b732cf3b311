"""/v1/chat/completions: OpenAI's chat API answering about one video, whole or streamed as chunks."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import redis.asyncio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.chat import (
    VideoRef,
    completion,
    completion_id,
    facts,
    finish_reason,
    job_failure,
    read_messages,
    usage,
)
from service.contract import AskMode, JobStatus, Settings
from service.deps import AsyncRedisDep, QueueDep, RecordsDep, SettingsDep, TenantDep
from service.errors import APIError, error_response, not_found, openai_responses
from service.ingest import download, receive_data_url
from service.openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChunkChoice,
    Delta,
)
from service.queue import TaskQueue
from service.records import Records
from service.routers.jobs import KEEP_ALIVE, finished_job, follow_events
from service.submissions import check_answerable, register_upload, submit_answer
from service.uploads import remove_quietly

router = APIRouter(prefix="/v1/chat", tags=["chat"])

PATH = "/v1/chat/completions"


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses={
        200: {"description": "With `stream`: `data: <chat.completion.chunk>` events, then `data: [DONE]`.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **openai_responses(400, 401, 404, 408, 409, 413, 415, 500, 503, 504, 507),
    },
)  # fmt: skip
async def create_chat_completion(
    body: ChatCompletionCreate, settings: SettingsDep, records: RecordsDep, queue: QueueDep,
    aredis: AsyncRedisDep, tenant: TenantDep,
):  # fmt: skip
    """Answer the last user message about the conversation's one video (the earlier ones are its history)."""
    if body.model != settings.served_model:
        raise APIError(404, "model_not_found", f"the model {body.model!r} does not exist; this service "
                       f"serves {settings.served_model!r}", param="model")  # fmt: skip
    turns = read_messages(body.messages)
    if len(turns.question) > settings.max_question_chars:
        raise APIError(400, "question_too_long", f"the question is longer than {settings.max_question_chars} "
                       "characters", param="messages")  # fmt: skip
    max_new_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens_limit
    if max_new_tokens > settings.max_new_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        message = f"at most {settings.max_new_tokens_limit} completion tokens"
        raise APIError(400, "validation_error", message, param=param)
    video = await _video(turns.video, settings, records, queue, tenant)
    job = await run_in_threadpool(
        lambda: submit_answer(
            records, queue, tenant=tenant, video=video, question=turns.question,
            mode=AskMode.CACHED.value, max_new_tokens=max_new_tokens, history=turns.history,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop_strings(),
        )
    )  # fmt: skip
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _chunks(records, aredis, job, tenant, settings.served_model, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    job = await finished_job(records, aredis, job["id"], tenant, settings.chat_wait_seconds)
    if job is None:
        raise not_found("video")  # deleted meanwhile
    if job["status"] == JobStatus.FAILED:
        raise job_failure(job)
    if job["status"] != JobStatus.SUCCEEDED:
        raise APIError(504, "answer_timeout", f"no answer within {settings.chat_wait_seconds:g} s; it is "
                       f"still coming: GET /jobs/{job['id']}")  # fmt: skip
    return completion(job, settings.served_model)


async def _video(ref: VideoRef, settings: Settings, records: Records, queue: TaskQueue, tenant: str) -> dict:
    """The conversation's video: an uploaded file, or a URL's video ingested now (deduplicated by content)."""
    if ref.file_id is not None:
        video = await run_in_threadpool(records.get_video, ref.file_id, tenant)
        if video is None:
            raise APIError(404, "not_found", f"no file {ref.file_id!r}", param="messages")
    else:
        data = ref.url.startswith("data:")
        upload = await (receive_data_url(ref.url, settings) if data else download(ref.url, settings))
        try:
            video, _ = await run_in_threadpool(register_upload, upload, settings, records, queue, tenant)
        finally:
            remove_quietly(upload.path)
    check_answerable(video)
    return video


async def _chunks(
    records: Records, aredis: redis.asyncio.Redis, job: dict, tenant: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """The answer job's tokens as chat.completion.chunk events (keep-alive comments while it waits for the
    video's indexing), its finish and usage, then `data: [DONE]`; an error event when it failed."""
    created = int(time.time())

    def chunk(delta: Delta, reason: str | None = None, **extra) -> str:
        choices = [] if extra.get("usage") else [ChunkChoice(delta=delta, finish_reason=reason)]
        body = ChatCompletionChunk(id=completion_id(job), created=created, model=model, choices=choices,
                                   **extra)  # fmt: skip
        return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

    yield chunk(Delta(role="assistant", content=""))
    try:
        async for _, kind, data in follow_events(records, aredis, job["id"], tenant):
            if kind == KEEP_ALIVE:
                yield ": keep-alive\n\n"
            elif kind == "token":
                yield chunk(Delta(content=data["text"]))
        final = await run_in_threadpool(records.get_job, job["id"], tenant)
    except (redis.ConnectionError, redis.TimeoutError):
        final = {"status": JobStatus.FAILED, "error_code": "redis_unavailable",
                 "error_message": "the job store is unavailable; ask again later"}  # fmt: skip
    if final is None or final["status"] != JobStatus.SUCCEEDED:
        failure = job_failure(final or {"error_code": "not_found", "error_message": "the video was deleted"})
        error = error_response(failure.status_code, failure.code, failure.message, path=PATH)
        yield f"data: {error.body.decode()}\n\n"
    else:
        yield chunk(Delta(), finish_reason(final), videoqa=json.loads(facts(final).model_dump_json()))
        if include_usage:
            yield chunk(Delta(), usage=usage(final))
    yield "data: [DONE]\n\n"
