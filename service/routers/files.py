"""/v1/files: OpenAI's Files API over the service's videos (one file is one video, indexed on upload)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ConversationsDep, QueueDep, RecordsDep, SettingsDep, TenantDep
from service.errors import APIError, not_found, openai_responses
from service.openai_schemas import FileDeleted, FileList, FileObject, FilePurpose
from service.routers.media import content_response
from service.submissions import register_upload, remove_video
from service.uploads import receive_request_upload, remove_quietly, upload_body

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = FilePurpose.__args__  # the purposes a video may be uploaded for


@router.post(
    "",
    response_model=FileObject,
    responses=openai_responses(400, 401, 408, 413, 415, 503, 507),
    openapi_extra=upload_body(purpose={"type": "string", "enum": list(PURPOSES)}),
)
async def create_file(
    request: Request, settings: SettingsDep, records: RecordsDep, queue: QueueDep, tenant: TenantDep
) -> FileObject:
    """Upload a video (multipart `file` and `purpose`); it is indexed at once, as a POST /videos upload."""
    upload = await receive_request_upload(request, settings)
    try:
        purpose = upload.fields.get("purpose")
        if purpose not in PURPOSES:
            raise APIError(400, "invalid_purpose", f"purpose must be one of {', '.join(PURPOSES)} (a video)",
                           param="purpose")  # fmt: skip
        video, _ = await run_in_threadpool(register_upload, upload, settings, records, queue, tenant,
                                           purpose=purpose)  # fmt: skip
    finally:
        remove_quietly(upload.path)  # moved into place, or a duplicate
    return FileObject.from_record(video)


@router.get("", response_model=FileList, responses=openai_responses(400, 401, 404))
def list_files(
    records: RecordsDep,
    tenant: TenantDep,
    limit: int = Query(100, ge=1, le=1000),
    after: str | None = Query(None, description="A file id: the page continues after it."),
) -> FileList:
    """The caller's files, newest first."""
    offset = 0
    if after is not None:
        rank = records.video_rank(tenant, after)
        if rank is None:
            raise APIError(404, "not_found", "the file `after` names does not exist", param="after")
        offset = rank + 1
    items, total = records.list_videos(tenant, offset=offset, limit=limit)
    data = [FileObject.from_record(video) for video in items]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=offset + len(items) < total)  # fmt: skip


@router.get("/{file_id}", response_model=FileObject, responses=openai_responses(401, 404))
def retrieve_file(file_id: str, records: RecordsDep, tenant: TenantDep) -> FileObject:
    """One file: `uploaded` while its video is indexed, `processed` when ready, `error` when that failed."""
    return FileObject.from_record(_video(records, file_id, tenant))


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"description": "The uploaded bytes.", "content": {"video/*": {}}},
               **openai_responses(400, 401, 404, 416)},
)  # fmt: skip
def file_content(file_id: str, request: Request, records: RecordsDep, tenant: TenantDep) -> FileResponse:
    """The file's bytes (HTTP Range works as for a video's content)."""
    return content_response(_video(records, file_id, tenant), request)


@router.delete("/{file_id}", response_model=FileDeleted, responses=openai_responses(401, 404))
def delete_file(
    file_id: str,
    settings: SettingsDep,
    records: RecordsDep,
    conversations: ConversationsDep,
    tenant: TenantDep,
) -> FileDeleted:
    """Delete the file: its video, jobs, conversations and compressed cache, as DELETE /videos/{id}."""
    remove_video(file_id, settings, records, conversations, tenant)
    return FileDeleted(id=file_id, deleted=True)


def _video(records, file_id: str, tenant: str) -> dict:
    video = records.get_video(file_id, tenant)
    if video is None:
        raise not_found("file")
    return video
