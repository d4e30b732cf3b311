"""A task's writes to its job's and its video's records, through one object.

A task run makes a dozen writes from several functions, and every one follows the same rules: the record
is written before its "status" or "done" event (readers re-read the record when they see one); a record
that is missing means its job or video was deleted meanwhile, and the task stops quietly (`Gone`); a
failure fails the video too only when the job is the video's index job and the video is not ready yet; and
a run whose job lease was taken over by a newer run writes nothing more (`LeaseLost`). `JobRecorder` keeps
those rules in one place, so the task code says what happened and not how it is stored.
"""

from __future__ import annotations

import time

from service.contract import JobStatus, VideoStatus
from service.records import Records
from worker.serving.leases import Lease

# The engine reports (stage, fraction); video status only moves forward through these.
_STAGE_STATUS = {
    "decoding": VideoStatus.DECODING,
    "encoding": VideoStatus.ENCODING,
    "prefilling": VideoStatus.PREFILLING,
}
_STATUS_ORDER = [VideoStatus.QUEUED, VideoStatus.DECODING, VideoStatus.ENCODING, VideoStatus.PREFILLING]
PROGRESS_INTERVAL = 0.5  # seconds between progress writes within one stage
TOKEN_FLUSH_SECONDS = 0.05  # answer text is streamed in batches at most this old


class Gone(Exception):
    """The video or job was deleted while we worked on it: stop, quietly."""


class JobRecorder:
    """The status, fields and events one task run writes for its job (None: a video with no index job, which
    has only its video to write) and for the video the job is about (`video`: its record when the run
    began)."""

    def __init__(self, records: Records, job_id: str | None, video: dict, lease: Lease | None = None) -> None:
        self.records = records
        self.job_id = job_id
        self.lease = lease
        self.video_id = video["id"]
        # A ready video stays ready when its rebuild fails; an answer job never fails its video.
        self.fails_video = (
            job_id is not None
            and job_id == video.get("index_job_id")
            and video["status"] != VideoStatus.READY
        )

    # ---- the job ------------------------------------------------------------------------------------------

    def running(self, **fields) -> None:
        self._job_status(JobStatus.RUNNING, **fields)

    def waiting_for_index(self) -> None:
        """Another worker is compressing this content right now."""
        self._job_status(JobStatus.WAITING_FOR_INDEX)

    def succeeded(self, **fields) -> None:
        self._finish(JobStatus.SUCCEEDED, {}, **fields)

    def failed(self, code: str, message: str, *, bad_upload: bool = False) -> None:
        """The job failed; so did its video after a `bad_upload` (whichever job found out), or where
        `fails_video`."""
        if bad_upload or self.fails_video:
            self.records.update_video(
                self.video_id,
                status=VideoStatus.FAILED,
                stage="failed",
                error_code=code,
                error_message=message,
            )
        self._finish(JobStatus.FAILED, {"error_code": code}, error_code=code, error_message=message)

    # ---- the video ----------------------------------------------------------------------------------------

    def video_ready(self, **fields) -> None:
        """The video indexed, with its facts in `fields`; earlier errors cleared."""
        self._video(
            status=VideoStatus.READY,
            stage="ready",
            progress=1.0,
            **fields,
            error_code=None,
            error_message=None,
        )

    # ---- what the engine calls while it works -------------------------------------------------------------

    def progress(self, *, track_video: bool) -> Progress:
        """A (stage, fraction) callback for one compression; `track_video` also moves the video's status."""
        return Progress(self, track_video=track_video)

    def token_stream(self) -> TokenStream:
        """A text callback for one answer, streaming it to the job's events."""
        return TokenStream(self)

    # ---- internals ----------------------------------------------------------------------------------------

    def _fence(self) -> None:
        """A run whose lease a newer run took over (it was paused, or cut off from Redis) writes nothing
        more: LeaseLost stops it, and its answer or compression on the scheduler with it. Asked of Redis
        only when the lease went unrenewed for its time to live: a resumed process writes before its
        lease keeper runs again."""
        if self.lease is not None and self.lease.may_have_lapsed():
            self.lease.check()

    def _job_status(self, status: JobStatus, **fields) -> None:
        self._fence()
        if self.job_id is not None and self.records.update_job(self.job_id, status=status, **fields):
            self.records.append_event(self.job_id, "status", {"status": status.value})

    def _finish(self, status: JobStatus, done: dict, **fields) -> None:
        """The terminal status and `fields`, then the "done" event (with `done` in it)."""
        self._fence()
        if self.job_id is not None and self.records.update_job(
            self.job_id, status=status, finished_at=time.time(), **fields
        ):
            self.records.append_event(self.job_id, "done", {"status": status.value, **done})

    def _video(self, **fields) -> None:
        self._fence()
        if not self.records.update_video(self.video_id, **fields):
            raise Gone(self.video_id)

    def _event(self, kind: str, data: dict) -> None:
        self._fence()
        if self.job_id is not None and self.records.append_event(self.job_id, kind, data) is None:
            raise Gone(self.job_id)


class Progress:
    """The engine's (stage, fraction) as video status and progress (0..1) and "progress" job events.

    Only a compression reports progress (a cache hit writes nothing here). It starts with ("decoding", 0);
    decoding then runs interleaved with encoding, so "decoding" is the status until the first slice is
    encoded. Overall progress is half encoding, half prefilling; status never moves backwards. Writes are
    throttled to one per PROGRESS_INTERVAL within a stage. Raises Gone when the video (or job) is deleted."""

    def __init__(self, recorder: JobRecorder, *, track_video: bool) -> None:
        self.recorder = recorder
        self.track_video = track_video
        self.status = VideoStatus.QUEUED
        self.fractions = {"encoding": 0.0, "prefilling": 0.0}
        self.last_write = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        if stage in self.fractions:
            self.fractions[stage] = max(self.fractions[stage], fraction)
        status = _STAGE_STATUS.get(stage, self.status)
        changed = _STATUS_ORDER.index(status) > _STATUS_ORDER.index(self.status)
        if changed:
            self.status = status
        if changed or fraction >= 1 or time.monotonic() - self.last_write >= PROGRESS_INTERVAL:
            self._write(
                self.status.value, 0.5 * self.fractions["encoding"] + 0.5 * self.fractions["prefilling"]
            )

    def _write(self, stage: str, progress: float) -> None:
        self.last_write = time.monotonic()
        progress = round(min(1.0, progress), 4)
        if self.track_video:
            self.recorder._video(status=self.status, stage=stage, progress=progress)
        self.recorder._event("progress", {"stage": stage, "progress": progress})


class TokenStream:
    """Answer text as "token" events ({"text": ...}), batched so a fast decoder does not write per token.
    Raises Gone when the job is deleted."""

    def __init__(self, recorder: JobRecorder) -> None:
        self.recorder = recorder
        self.pending: list[str] = []
        self.last_flush = time.monotonic()

    def __call__(self, text: str) -> None:
        self.pending.append(text)
        if time.monotonic() - self.last_flush >= TOKEN_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if self.pending:
            text, self.pending = "".join(self.pending), []
            self.recorder._event("token", {"text": text})
