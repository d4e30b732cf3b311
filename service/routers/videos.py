"""Videos: upload (streamed) or give by URL, read, list, delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.contract import Settings, VideoStatus
from service.deps import ConversationsDep, DownloadsDep, QueueDep, RecordsDep, SettingsDep, TenantDep
from service.errors import not_found, responses
from service.schemas import VideoFromURL, VideoList, VideoPublic
from service.submissions import register_upload, remove_video
from service.uploads import read_json, receive_request_upload, remove_quietly, upload_body
from service.webhooks import check_callback

router = APIRouter(prefix="/videos", tags=["videos"])

INDEX_RETRY_AFTER_S = 5
MAX_OFFSET = 1_000_000_000  # Redis ranges are 64-bit: an offset near 2**63 would overflow there


@router.post(
    "",
    status_code=202,
    response_model=VideoPublic,
    responses={
        200: {"model": VideoPublic, "description": "The caller uploaded these bytes before: that video."},
        **responses(400, 401, 408, 413, 415, 422, 503, 507),
    },
    openapi_extra=upload_body(
        json_schema=VideoFromURL.model_json_schema(),
        optional=frozenset({"callback_url"}),
        callback_url={"type": "string", "maxLength": 8192},
    ),  # fmt: skip
)
async def upload_video(
    request: Request, response: Response, settings: SettingsDep, records: RecordsDep, queue: QueueDep,
    downloads: DownloadsDep, tenant: TenantDep,
) -> VideoPublic:  # fmt: skip
    """Upload a video as multipart field `file`, or give its URL as JSON; it is indexed in the background."""
    if request.headers.get("content-type", "").partition(";")[0].strip() == "application/json":
        body = await read_json(request, VideoFromURL)
        callback = await _callback(body.callback_url, settings)
        video = await downloads.start(body.url, tenant, **callback)
        response.headers["Location"] = f"/videos/{video['id']}"
        response.headers["Retry-After"] = str(INDEX_RETRY_AFTER_S)
        return VideoPublic.from_record(video)
    upload = await receive_request_upload(request, settings)
    try:
        callback = await _callback(upload.fields.get("callback_url"), settings)
        video, created = await run_in_threadpool(
            lambda: register_upload(upload, settings, records, queue, tenant, **callback)
        )
    finally:
        remove_quietly(upload.path)  # moved into place, or a duplicate
    if callback and not created and video["status"] not in (VideoStatus.READY, VideoStatus.FAILED):
        await run_in_threadpool(lambda: records.update_video(video["id"], **callback))
    response.headers["Location"] = f"/videos/{video['id']}"
    if created:
        response.headers["Retry-After"] = str(INDEX_RETRY_AFTER_S)
    else:
        response.status_code = 200
    return VideoPublic.from_record(video)


async def _callback(url: str | None, settings: Settings) -> dict[str, str]:
    """The video's callback_url field, once the SSRF guard let it pass; {} without one."""
    if not url:
        return {}
    return {"callback_url": await run_in_threadpool(check_callback, url, settings)}


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
    remove_video(video_id, settings, records, conversations, tenant)
    return Response(status_code=204)  # no body, so no Content-Type either
