"""Videos: upload (streamed), read, list, delete."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.contract import JobStatus, Settings, VideoStatus
from service.deps import ConversationsDep, QueueDep, RecordsDep, SettingsDep, TenantDep
from service.errors import APIError, not_found, responses
from service.queue import TaskQueue
from service.records import Records, new_id
from service.schemas import VideoList, VideoPublic
from service.uploads import FILE_FIELD, ReceivedUpload, incoming_dir, receive_upload, remove_quietly

log = logging.getLogger(__name__)

router = APIRouter(prefix="/videos", tags=["videos"])

INDEX_RETRY_AFTER_S = 5
MAX_OFFSET = 1_000_000_000  # Redis ranges are 64-bit: an offset near 2**63 would overflow there

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=VideoPublic,
    responses={
        200: {"model": VideoPublic, "description": "The caller uploaded these bytes before: that video."},
        **responses(400, 401, 408, 413, 415, 422, 503, 507),
    },
    openapi_extra=_UPLOAD_BODY,
)
async def upload_video(
    request: Request, response: Response, settings: SettingsDep, records: RecordsDep, queue: QueueDep,
    tenant: TenantDep,
) -> VideoPublic:  # fmt: skip
    """Upload a video as multipart field `file`; it is indexed in the background (poll its index job)."""
    upload = await receive_upload(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        content_length=request.headers.get("content-length"),
        directory=incoming_dir(settings),
        max_bytes=settings.max_upload_bytes,
        idle_timeout=settings.upload_idle_timeout_seconds,
    )
    try:
        video, created = await run_in_threadpool(register_upload, upload, settings, records, queue, tenant)
    finally:
        remove_quietly(upload.path)  # moved into place, or a duplicate
    response.headers["Location"] = f"/videos/{video['id']}"
    if created:
        response.headers["Retry-After"] = str(INDEX_RETRY_AFTER_S)
    else:
        response.status_code = 200
    return VideoPublic.from_record(video)


def register_upload(
    upload: ReceivedUpload, settings: Settings, records: Records, queue: TaskQueue, tenant: str
) -> tuple[dict, bool]:
    """Record the upload (or find the tenant's video with the same bytes), move it into place, enqueue it."""
    video_id = new_id("vid")
    final_path = (settings.uploads_dir / f"{video_id}.{upload.extension}").resolve()
    video, created = records.create_video(
        tenant=tenant, sha256=upload.sha256, filename=upload.filename, size_bytes=upload.size_bytes,
        path=str(final_path), container=upload.container, video_id=video_id,
    )  # fmt: skip
    if not created:
        return video, False
    os.replace(upload.path, final_path)  # same filesystem: atomic, never a half-written video
    try:
        job = records.create_job(tenant=tenant, video_id=video_id, kind="index")
    except LookupError:  # deleted by a concurrent DELETE before we got here
        remove_quietly(final_path)
        raise not_found("video") from None
    records.update_video(video_id, index_job_id=job["id"])
    try:
        queue.index(video_id, job["id"])
    except Exception as exc:  # broker down: fail the video so a new upload of the bytes retries
        log.error("could not enqueue %s: %s", video_id, exc)
        message = "the task queue is unavailable; upload again later"
        error = {"error_code": "queue_unavailable", "error_message": message}
        records.update_job(job["id"], status=JobStatus.FAILED, **error)
        records.update_video(video_id, status=VideoStatus.FAILED, **error)
        raise APIError(503, "queue_unavailable", message, headers={"Retry-After": "10"}) from exc
    return records.get_video(video_id) or video, True


@router.get("", response_model=VideoList, responses=responses(401, 422))
def list_videos(
    records: RecordsDep,
    tenant: TenantDep,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(20, ge=1, le=100),
) -> VideoList:
    """The caller's videos, newest first."""
    items, total = records.list_videos(tenant, offset=offset, limit=limit)
    return VideoList(
        items=[VideoPublic.from_record(v) for v in items], total=total, offset=offset, limit=limit
    )


@router.get("/{video_id}", response_model=VideoPublic, responses=responses(401, 404))
def get_video(video_id: str, records: RecordsDep, tenant: TenantDep) -> VideoPublic:
    """One video: status, indexing progress and facts, or why it failed."""
    video = records.get_video(video_id, tenant)
    if video is None:
        raise not_found("video")
    return VideoPublic.from_record(video)


@router.delete(
    "/{video_id}",
    status_code=204,
    response_class=Response,
    response_model=None,
    responses=responses(401, 404),
)
def delete_video(
    video_id: str,
    settings: SettingsDep,
    records: RecordsDep,
    conversations: ConversationsDep,
    tenant: TenantDep,
) -> Response:
    """Delete a video with its upload, jobs, events and compressed cache (unless another video shares it)."""
    if records.get_video(video_id, tenant) is None:
        raise not_found("video")
    video = records.delete_video(video_id)
    if video is None:  # deleted concurrently
        raise not_found("video")
    conversations.delete_for_video(video_id)
    remove_quietly(video["path"])
    if video.get("artifact_key") and records.release_artifact(video["artifact_key"], video_id):
        paths = artifact_paths(settings, video["artifact_key"])
        for path in paths:
            remove_quietly(path)
        if paths:
            shutil.rmtree(settings.frames_dir(video["artifact_key"]), ignore_errors=True)  # its thumbnails
    return Response(status_code=204)  # no body, so no Content-Type either


def artifact_paths(settings: Settings, artifact_key: str) -> list[Path]:
    """artifacts_dir/<artifact_key>.safetensors and the vision features beside it (.features.safetensors),
    the workers' disk store layout; none when the key would escape artifacts_dir."""
    root = settings.artifacts_dir.resolve()
    paths = [
        (root / f"{artifact_key}{suffix}").resolve() for suffix in (".safetensors", ".features.safetensors")
    ]
    return [path for path in paths if path.is_relative_to(root)]
