"""What the routes of both APIs (ours and /v1) do alike: register a received video and enqueue its indexing,
delete a video with everything it owns, and submit an answer job to the workers."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from service.contract import JobStatus, Settings, VideoStatus
from service.conversations import Conversations
from service.errors import APIError, not_found
from service.queue import TaskQueue
from service.records import Records, new_id
from service.uploads import ReceivedUpload, remove_quietly

log = logging.getLogger(__name__)


def register_upload(
    upload: ReceivedUpload, settings: Settings, records: Records, queue: TaskQueue, tenant: str, **fields
) -> tuple[dict, bool]:
    """Record the upload (or find the tenant's video with the same bytes), move it into place, enqueue it.
    `fields` are set on a new video's record (e.g. a file's purpose)."""
    video_id = new_id("vid")
    final_path = (settings.uploads_dir / f"{video_id}.{upload.extension}").resolve()
    video, created = records.create_video(
        tenant=tenant, sha256=upload.sha256, filename=upload.filename, size_bytes=upload.size_bytes,
        path=str(final_path), container=upload.container, video_id=video_id,
    )  # fmt: skip
    if not created:
        return video, False
    return _start_indexing(video_id, upload, final_path, records, queue, tenant, **fields), True


def register_download(
    video_id: str, upload: ReceivedUpload, settings: Settings, records: Records, queue: TaskQueue, tenant: str
) -> dict | None:
    """A downloading video's file has arrived: its facts on the record, the file in place, its indexing
    enqueued -> the record; None when the video was deleted meanwhile (the file is then removed)."""
    final_path = (settings.uploads_dir / f"{video_id}.{upload.extension}").resolve()
    facts = {"sha256": upload.sha256, "filename": upload.filename, "size_bytes": upload.size_bytes,
             "path": str(final_path), "container": upload.container}  # fmt: skip
    if not records.update_video(video_id, **facts):
        remove_quietly(upload.path)
        return None
    # queued together with its index job, as an upload is
    return _start_indexing(video_id, upload, final_path, records, queue, tenant, status=VideoStatus.QUEUED,
                           stage="queued")  # fmt: skip


def _start_indexing(
    video_id: str, upload: ReceivedUpload, final_path: Path, records: Records, queue: TaskQueue, tenant: str,
    **fields,
) -> dict:  # fmt: skip
    os.replace(upload.path, final_path)  # same filesystem: atomic, never a half-written video
    try:
        job = records.create_job(tenant=tenant, video_id=video_id, kind="index")
    except LookupError:  # deleted by a concurrent DELETE before we got here
        remove_quietly(final_path)
        raise not_found("video") from None
    records.update_video(video_id, index_job_id=job["id"], **fields)
    try:
        queue.index(video_id, job["id"])
    except Exception as exc:  # broker down: fail the video so a new upload of the bytes retries
        log.error("could not enqueue %s: %s", video_id, exc)
        message = "the task queue is unavailable; upload again later"
        error = {"error_code": "queue_unavailable", "error_message": message}
        records.update_job(job["id"], status=JobStatus.FAILED, **error)
        records.update_video(video_id, status=VideoStatus.FAILED, **error)
        raise APIError(503, "queue_unavailable", message, headers={"Retry-After": "10"}) from exc
    return records.get_video(video_id) or {}


def remove_video(
    video_id: str, settings: Settings, records: Records, conversations: Conversations, tenant: str
) -> None:
    """Delete the tenant's video with its upload, jobs, events, conversations and compressed cache (unless
    another video shares it); 404 when the tenant has no such video."""
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


def artifact_paths(settings: Settings, artifact_key: str) -> list[Path]:
    """artifacts_dir/<artifact_key>.safetensors and the vision features beside it (.features.safetensors),
    the workers' disk store layout; none when the key would escape artifacts_dir."""
    root = settings.artifacts_dir.resolve()
    paths = [
        (root / f"{artifact_key}{suffix}").resolve() for suffix in (".safetensors", ".features.safetensors")
    ]
    return [path for path in paths if path.is_relative_to(root)]


def check_answerable(video: dict) -> None:
    """409 when no question about the video can be answered: it failed to index (video_failed), or it is
    still downloading (video_downloading: ask again once it is queued)."""
    if video["status"] == VideoStatus.FAILED:
        raise APIError(409, "video_failed", f"the video failed to index ({video.get('error_code')}: "
                       f"{video.get('error_message')}): upload it again")  # fmt: skip
    if video["status"] == VideoStatus.DOWNLOADING:
        raise APIError(409, "video_downloading", "the video is still downloading; ask once its status is "
                       "queued", headers={"Retry-After": "5"})  # fmt: skip


def submit_answer(records: Records, queue: TaskQueue, *, tenant: str, video: dict, **fields) -> dict:
    """A new answer job about the video (question, mode, max_new_tokens, ... in `fields`), enqueued on the
    queue its route names (service/routing.py) -> its record. 404 when the video is gone; 503
    queue_unavailable (the job failed) when the broker is."""
    route = queue.route(video)
    try:
        job = records.create_job(tenant=tenant, video_id=video["id"], kind="answer", routed_to=route.worker,
                                 route=route.reason, **fields)  # fmt: skip
    except LookupError:
        raise not_found("video") from None
    records.incr_counter("routing", route.reason)
    try:
        queue.answer(job["id"], route.queue)
    except Exception as exc:
        log.error("could not enqueue %s: %s", job["id"], exc)
        message = "the task queue is unavailable; ask again later"
        error = {"error_code": "queue_unavailable", "error_message": message}
        records.update_job(job["id"], status=JobStatus.FAILED, **error)
        raise APIError(503, "queue_unavailable", message, headers={"Retry-After": "10"}) from exc
    return job
