"""Videos given by URL (POST /videos with {"url": ...}): recorded at once as `downloading`, fetched by this
API process in the background (service/ingest.py), then indexed like an upload, or failed with the
download's error code."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import anyio
from starlette.concurrency import run_in_threadpool

from service.contract import Settings, VideoStatus
from service.errors import APIError
from service.ingest import download
from service.queue import TaskQueue
from service.records import Records
from service.submissions import register_download
from service.uploads import remove_quietly, safe_filename
from service.url_guard import check_url, parse_networks

log = logging.getLogger(__name__)

DEADLINE_SLACK_S = 60.0  # past its time cap and this, a download still running has lost its process
INTERRUPTED = "url_interrupted", "the download stopped with the API process that ran it: give the URL again"


class Downloads:
    """The downloads this process runs, as asyncio tasks; `close()` cancels them and fails their videos
    (`url_interrupted`: give the URL again)."""

    def __init__(self, settings: Settings, records: Records, queue: TaskQueue) -> None:
        self.settings, self.records, self.queue = settings, records, queue
        self.tasks: set[asyncio.Task] = set()

    async def start(self, url: str, tenant: str, **fields) -> dict:
        """A `downloading` video for the URL, its download started -> its record. A URL the SSRF guard
        refuses is a 400 now, before anything connects anywhere."""
        await check_url(url, parse_networks(self.settings.url_allowed_networks))
        deadline = time.time() + self.settings.url_timeout_seconds + DEADLINE_SLACK_S
        name = safe_filename(urlsplit(url).path.encode()) if urlsplit(url).path.strip("/") else "video"
        video = await run_in_threadpool(
            lambda: self.records.create_download(
                tenant=tenant, url=url, filename=name, deadline=deadline, **fields
            )  # fmt: skip
        )
        task = asyncio.create_task(self._fetch(video["id"], url, tenant), name=f"download-{video['id']}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return video

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _fetch(self, video_id: str, url: str, tenant: str) -> None:
        try:
            upload = await download(url, self.settings)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await self._fail(video_id, *INTERRUPTED)
            raise
        except APIError as exc:
            await self._fail(video_id, exc.code, exc.message)
            return
        except Exception:
            log.exception("downloading %s for %s failed", url, video_id)
            await self._fail(video_id, "internal_error", "the download failed; see the API's log")
            return
        try:
            await run_in_threadpool(
                register_download, video_id, upload, self.settings, self.records, self.queue, tenant
            )
        except APIError as exc:  # deleted meanwhile, or the queue is down (the video is failed then)
            log.info("video %s downloaded but not indexed: %s", video_id, exc.message)
        finally:
            remove_quietly(upload.path)  # moved into place unless something failed

    async def _fail(self, video_id: str, code: str, message: str) -> None:
        await run_in_threadpool(lambda: self.records.update_video(
            video_id, status=VideoStatus.FAILED, stage="failed", error_code=code, error_message=message
        ))  # fmt: skip
