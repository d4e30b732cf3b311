"""A video's bytes for the player (HTTP Range) and its frame thumbnails, by Bearer key or signed token."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from service.contract import Settings
from service.deps import RecordsDep, SettingsDep, TenantDep, bearer, get_tenant
from service.errors import APIError, not_found, responses
from service.media import MediaTokens, media_type
from service.schemas import MediaToken

router = APIRouter(prefix="/videos", tags=["media"])

FRAME_CACHE_CONTROL = "private, max-age=31536000, immutable"  # a frame of given bytes never changes
TOKEN_DESCRIPTION = "A token from POST /videos/{video_id}/media-token, instead of the Authorization header."
_ARTIFACT_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")


def media_tokens(request: Request) -> MediaTokens:
    return request.app.state.media_tokens


async def media_video(
    video_id: str,
    request: Request,
    records: RecordsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    token: Annotated[str | None, Query(description=TOKEN_DESCRIPTION)] = None,
) -> dict:
    """The video, for the Bearer key's tenant or for a valid token of this video; 404 when neither owns it."""
    if token is not None and request.app.state.tenants_by_key:
        if not media_tokens(request).valid(token, video_id):
            raise APIError(401, "invalid_token", "the media token is invalid or expired: mint a new one")
        video = await run_in_threadpool(records.get_video, video_id)
    else:
        tenant = get_tenant(request, credentials)
        video = await run_in_threadpool(records.get_video, video_id, tenant)
    if video is None:
        raise not_found("video")
    return video


MediaVideoDep = Annotated[dict, Depends(media_video)]


@router.post("/{video_id}/media-token", response_model=MediaToken, responses=responses(401, 404))
def mint_media_token(video_id: str, request: Request, records: RecordsDep, tenant: TenantDep) -> MediaToken:
    """A short-lived token for this video's content and frames, for elements that cannot send a header."""
    if records.get_video(video_id, tenant) is None:
        raise not_found("video")
    token, expires = media_tokens(request).mint(video_id)
    return MediaToken(
        token=token, expires_at=expires, content_url=f"/videos/{video_id}/content?token={token}",
        frames_url=f"/videos/{video_id}/frames/{{index}}?token={token}",
    )  # fmt: skip


@router.get(
    "/{video_id}/content",
    response_class=FileResponse,
    responses={
        200: {"description": "The uploaded file.", "content": {"video/*": {}}},
        206: {"description": "The requested byte range (`Range: bytes=start-end`)."},
        **responses(400, 401, 404, 416),
    },
)
def video_content(video: MediaVideoDep, request: Request) -> FileResponse:
    """The uploaded file, streamed from disk, with HTTP Range support for seeking players."""
    return content_response(video, request)


def content_response(video: dict, request: Request) -> FileResponse:
    """The video's uploaded file, whole or the bytes its Range asks for."""
    path = Path(video["path"])
    if not path.is_file():
        raise APIError(404, "not_found", "the video's file is missing from the data volume")
    if (requested := request.headers.get("range")) is not None:
        _check_range(requested, path.stat().st_size)
    return FileResponse(
        path, media_type=media_type(video.get("container")), headers={"Cache-Control": "private, no-cache"}
    )


def _check_range(requested: str, size: int) -> None:
    """Refuse a bad Range with our JSON error body; FileResponse serves the good ones (and would answer
    the bad ones in plain text). Starlette's own parser decides, so both always agree."""
    try:
        FileResponse._parse_range_header(requested, size)
    except RangeNotSatisfiable:
        raise APIError(416, "range_not_satisfiable", f"the range is outside the file ({size} bytes)",
                       headers={"Content-Range": f"bytes */{size}"}) from None  # fmt: skip
    except MalformedRangeHeader as exc:
        raise APIError(400, "invalid_range", f"Range: {exc.content}") from None


@router.get(
    "/{video_id}/frames/{index}",
    response_class=FileResponse,
    responses={
        200: {"description": "A JPEG thumbnail.", "content": {"image/jpeg": {}}},
        **responses(401, 404),
    },
)
def video_frame(
    index: Annotated[int, PathParam(ge=0)], video: MediaVideoDep, settings: SettingsDep
) -> FileResponse:
    """The thumbnail of sampled frame `index` (its index in a job's evidence timeline), made when indexing."""
    path = frame_path(settings, video.get("artifact_key"), index)
    if path is None or not path.is_file():
        raise not_found("frame")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": FRAME_CACHE_CONTROL})


def frame_path(settings: Settings, artifact_key: str | None, index: int) -> Path | None:
    if not artifact_key or not _ARTIFACT_KEY.match(artifact_key) or ".." in artifact_key:
        return None
    return settings.frames_dir(artifact_key) / f"{index}.jpg"
