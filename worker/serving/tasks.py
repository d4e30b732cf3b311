"""The GPU tasks: thin adapters from an id in a message to the engine, and from its results to the records
(through a `JobRecorder`, one per task run).

    index_video(video_id)  decode, encode and compress the upload once (single flight across workers);
                           the video goes queued -> decoding -> encoding -> prefilling -> ready | failed
    answer(job_id)         answer from the video's compressed cache (building it on a miss), streaming
                           tokens as job events; or compress anew with the question as the guide

Both are idempotent (a redelivered message redoes the work or finds it done: artifacts are keyed by
content and settings) and stop quietly when their video or job was deleted meanwhile. A bad upload fails
its video with the decoder's error code and is never retried; only named transient Redis errors are, in the
task itself. While a task runs, its worker renews the job's lease; when the worker dies, the API's stale-job
reaper (service/recovery.py) sends the job again or fails it.
The work itself lives in `index_video_job` / `answer_job`, plain functions of a `WorkerRuntime` that tests
call directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import redis
import torch
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from service.contract import (
    ANSWER_TASK,
    INDEX_TASK,
    STORAGE_FULL_ERRNOS,
    TERMINAL_JOB_STATES,
    AskMode,
    CacheTier,
    Settings,
    VideoStatus,
)
from service.conversations import Conversations
from worker.engine.artifact import CompressedKV
from worker.engine.decode import VideoDecodeError
from worker.engine.engine import IndexResult, artifact_key, compress_for_question, get_or_compress
from worker.engine.focus import FocusConfig, answer_focused
from worker.engine.scheduler import CacheBudgetExceeded, Cancelled, RequestTimeout
from worker.engine.token_sampling import TokenSampling
from worker.serving import runtime as worker_runtime
from worker.serving.celery_app import app
from worker.serving.leases import Lease, LeaseLost
from worker.serving.recorder import Gone, JobRecorder
from worker.serving.runtime import WorkerRuntime
from worker.serving.thumbnails import ThumbnailWriter

logger = logging.getLogger(__name__)

# Errors worth a retry: the broker or the records' Redis blinked. Everything else is a result.
TRANSIENT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RETRY_FIRST_DELAY_S, RETRY_MAX_DELAY_S = 0.5, 30.0
T = TypeVar("T")

# ---- the Celery face ------------------------------------------------------------------------------------


class GpuTask(Task):
    """Base of the GPU tasks: the process's runtime (one model, one set of tiers), created on first use, and
    `run_job`: the job's lease, held while the task runs, and retries of transient Redis errors.

    Retries happen here, in the task, with backoff and jitter, for as long as the task may run. Celery's own
    retry would publish a new message to the broker, which may be the very Redis that is down (Celery then
    drops the task: `Reject(requeue=False)`, and the job would stay "running" forever)."""

    @property
    def runtime(self) -> WorkerRuntime:
        return worker_runtime.current()

    def run_job(self, job_id: str, work: Callable[[WorkerRuntime, Lease, float], None]) -> None:
        rt = self.runtime
        deadline = time.monotonic() + rt.settings.soft_time_limit
        lease = rt.job_lease(job_id)
        if not with_transient_retries(lambda: _take(lease, rt.settings.lease_seconds), deadline):
            logger.info("job %s is run by a live worker already: this delivery is a duplicate", job_id)
            return
        rt.keeper.add(lease)
        try:
            with rt.running():  # a retry keeps the deadline
                with_transient_retries(lambda: work(rt, lease, deadline), deadline)
        finally:
            rt.keeper.discard(lease)
            lease.release()


def _take(lease: Lease, lease_seconds: float) -> bool:
    """Take the job's lease, waiting out the lease of a worker that died running it (a message redelivered
    after a killed child finds it still there for up to `lease_seconds`). A live holder keeps renewing it:
    then False."""
    deadline = time.monotonic() + 2 * lease_seconds
    while not lease.acquire():
        if time.monotonic() > deadline:
            return False
        time.sleep(min(1.0, lease_seconds / 4))
    return True


def with_transient_retries(call: Callable[[], T], deadline: float) -> T:
    """`call()`, again after each transient Redis error (backoff 0.5 s doubling to 30 s, with jitter) until
    `deadline` (time.monotonic()); the error of the last try is raised after it."""
    delay = RETRY_FIRST_DELAY_S
    while True:
        try:
            return call()
        except TRANSIENT_ERRORS as error:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("redis unavailable (%s): trying again in %.1f s", error, delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, RETRY_MAX_DELAY_S)


@app.task(name=INDEX_TASK, base=GpuTask, bind=True)
def index_video(self: GpuTask, video_id: str) -> None:
    """Compress the video once into its artifact (or find it), and mark it ready or failed."""
    self.run_job(self.request.id, lambda rt, lease, deadline: index_video_job(rt, video_id, lease, deadline))


@app.task(name=ANSWER_TASK, base=GpuTask, bind=True)
def answer(self: GpuTask, job_id: str) -> None:
    """Answer the job's question about its video, streaming tokens to the job's events."""
    self.run_job(job_id, lambda rt, lease, deadline: answer_job(rt, job_id, lease, deadline))


# ---- index ------------------------------------------------------------------------------------------------


def index_video_job(
    rt: WorkerRuntime, video_id: str, lease: Lease | None = None, deadline: float | None = None
) -> None:
    """Index the video; with the job's `lease`, results are written only while no newer run holds it. Its
    model work ends at `deadline` (time.monotonic(); default: the soft time limit from now)."""
    records = rt.records
    video = records.get_video(video_id)
    if video is None:
        logger.info("index %s: the video is gone", video_id)
        return
    job_id = video.get("index_job_id")
    job = records.get_job(job_id) if job_id else None
    if video["status"] == VideoStatus.FAILED or (job is not None and job["status"] in TERMINAL_JOB_STATES):
        return  # a redelivered message for work already recorded as done
    deadline = deadline or time.monotonic() + rt.settings.soft_time_limit
    recorder = JobRecorder(records, job_id, video, lease)
    recorder.running(started_at=time.time(), worker=rt.name)
    result = None
    try:
        with _recording_failures(rt, video, recorder, lease):
            result = _index(rt, video, recorder, deadline)
            _check(lease)
    except Gone:
        logger.info("index %s: deleted while indexing", video_id)
        return
    except LeaseLost as error:
        logger.warning("index %s: a newer run took the job over (%s); its result stands", video_id, error)
        return
    if result is None:  # failed, and recorded as such
        return
    recorder.succeeded(
        cache_hit=result.hit,
        cache_tier=result.tier,
        cache_reason=cache_reason(result),
        timings=_rounded(_video_timings(result)),
        warnings=damage_warnings(result.artifact.metadata["report"]),
    )


def damage_warnings(report: dict) -> list[str]:
    """The job's warnings about a video indexed around damaged data (none for a whole file)."""
    spans = report.get("damaged_seconds") or []
    if not spans:
        return []
    where = ", ".join(f"{start:.1f}-{end:.1f} s" for start, end in spans)
    return [
        f"damaged_video: {report['lost_frames']} of {report['frames']} sampled frames lie in data that does "
        f"not decode ({where}); each repeats the nearest good frame"
    ]


def _index(rt: WorkerRuntime, video: dict, recorder: JobRecorder, deadline: float) -> IndexResult:
    """The video's artifact via the tiers and the single-flight lock. While it is being built (on the
    scheduler, until `deadline`), progress goes to the video (unless it is already ready: a rebuild after
    eviction) and to the job's events, and the decoded frames become its thumbnails."""
    records = rt.records
    path = video_path(rt, video)
    if not path.is_file():
        raise UploadMissing(f"{video['filename']}: the uploaded file is missing from the data volume")
    track_video = video["status"] != VideoStatus.READY
    identity = cache_identity(video, rt.settings)
    key = artifact_key(rt.loaded, identity, rt.config)
    thumbnails = ThumbnailWriter(rt.settings.frames_dir(key.to_string()))
    try:
        result = get_or_compress(
            rt.loaded,
            rt.store,
            path,
            rt.config,
            on_progress=recorder.progress(track_video=track_video),
            on_frame=thumbnails,
            lock=rt.single_flight(recorder.waiting_for_index),
            video_hash=identity,
            run=functools.partial(rt.scheduler.run, deadline=deadline),
        )
        thumbnails.commit()
    finally:
        thumbnails.discard()
    if result.waited:
        recorder.running()
    if not result.hit:
        records.incr_counter("engine", "compressions")
    if result.reason.startswith("corrupt"):
        records.incr_counter("cache", "corrupt")
        logger.warning(
            "artifact %s was damaged and has been rebuilt: %s", result.key.to_string(), result.reason
        )
    if track_video or not result.hit:  # a first index, or a rebuild: (re)write the video's facts
        _mark_ready(rt, recorder, result)
    return result


def _mark_ready(rt: WorkerRuntime, recorder: JobRecorder, result: IndexResult) -> None:
    report = result.artifact.metadata["report"]
    key = result.key.to_string()
    timestamps = result.artifact.timestamps
    # Setting artifact_key also registers the video as a user of the artifact (Records, atomically).
    recorder.video_ready(
        duration=report.get("duration", timestamps[-1] if timestamps else 0.0),
        frames=report["frames"],
        damaged_seconds=report.get("damaged_seconds", []),  # artifacts built before it was reported: []
        tokens_before=int(report["video_tokens_before"]),
        tokens_after=round(report["video_tokens_after"]),  # mean over layers
        artifact_bytes=rt.store.disk.nbytes(result.key) or result.nbytes,
        features_bytes=rt.store.disk.features_nbytes(result.key),
        cache_tier=CacheTier.DISK,  # where every worker finds it
        artifact_key=key,
    )


# ---- answer -----------------------------------------------------------------------------------------------


def answer_job(
    rt: WorkerRuntime, job_id: str, lease: Lease | None = None, deadline: float | None = None
) -> None:
    """Answer the job; with its `lease`, results are written only while no newer run holds it. Its model work
    ends at `deadline` (time.monotonic(); default: the soft time limit from now)."""
    records = rt.records
    job = records.get_job(job_id)
    if job is None or job["status"] in TERMINAL_JOB_STATES:
        return  # deleted with its video, or a redelivered message for finished work
    video = records.get_video(job["video_id"])
    if video is None:
        logger.info("answer %s: the video is gone", job_id)
        return
    recorder = JobRecorder(records, job_id, video, lease)
    if video["status"] == VideoStatus.FAILED:
        message = f"the video could not be indexed: {video.get('error_message') or video.get('error_code')}"
        recorder.failed("video_failed", message)
        return
    recorder.running(started_at=time.time(), worker=rt.name)
    try:
        with _recording_failures(rt, video, recorder, lease):
            _answer(
                rt, job, video, recorder, lease, deadline or time.monotonic() + rt.settings.soft_time_limit
            )
    except Gone:
        logger.info("answer %s: deleted while answering", job_id)
    except LeaseLost as error:
        logger.warning("answer %s: a newer run took the job over (%s); its result stands", job_id, error)


def _answer(
    rt: WorkerRuntime, job: dict, video: dict, recorder: JobRecorder, lease: Lease | None, deadline: float
) -> None:
    """Answer on the scheduler, with every other request of this worker, until `deadline`."""
    records, job_id = rt.records, job["id"]
    question = job["question"]
    started = time.perf_counter()
    focused = job.get("mode") == AskMode.FOCUSED
    if focused and not video_path(rt, video).is_file():
        message = "a focused answer re-reads the video, and the uploaded file is missing from the data volume"
        raise UploadMissing(f"{video['filename']}: {message}")
    if job.get("mode") == AskMode.QUESTION_GUIDED:  # compressed for this question, from kept features
        artifact, reused = compress_for_question(
            rt.loaded,
            rt.store,
            video_path(rt, video),
            question,
            rt.config,
            video_hash=cache_identity(video, rt.settings),
            on_progress=recorder.progress(track_video=False),
            run=functools.partial(rt.scheduler.run, deadline=deadline),
        )
        records.incr_counter("engine", "compressions")
        records.incr_counter("engine", "features_reused" if reused else "features_recomputed")
        video_seconds = artifact.metadata["report"]["seconds"]
        cache = {"cache_hit": False, "cache_tier": CacheTier.NONE, "cache_reason": "question_guided"}
        timings = _video_timings_from(video_seconds)
    else:
        result = _index(rt, video, recorder, deadline)
        artifact = result.artifact
        cache = {"cache_hit": result.hit, "cache_tier": result.tier, "cache_reason": cache_reason(result)}
        records.incr_counter("cache", cache_reason(result))
        timings = _video_timings(result)

    history = [tuple(turn) for turn in job.get("history") or []]  # sent with the question (/v1), or:
    if job.get("conversation_id"):
        history = Conversations(records).history(job["conversation_id"], before_job_id=job_id)
    stream = recorder.token_stream()
    max_new_tokens = job.get("max_new_tokens") or 128

    def ask(artifact: CompressedKV, tokens: int):
        return rt.scheduler.submit_answer(
            artifact, question, max_new_tokens=tokens, on_text=stream, history=history,
            max_history_tokens=rt.settings.conversation_history_tokens, sampling=token_sampling(job),
            deadline=deadline,
        ).result()  # fmt: skip

    # Focused: the cache's evidence, then the video re-read around it (decoded here, the model's work on the
    # scheduler, as the question-guided compression's).
    if focused:
        reply = answer_focused(
            rt.loaded, artifact, video_path(rt, video), ask, config=focus_config(rt.settings),
            sampling=rt.config.sampling, max_new_tokens=max_new_tokens,
            run=functools.partial(rt.scheduler.run, deadline=deadline),
        )  # fmt: skip
        cache["focus"] = reply.focus
    else:
        reply = ask(artifact, max_new_tokens)
    stream.flush()
    timings |= {
        "question_prefill": reply.timings["prefill"],
        "generate": reply.timings["generate"],
        "evidence": reply.timings["evidence"],
        **{stage: value for stage, value in reply.timings.items() if stage.startswith("focus_")},
        "total": time.perf_counter() - started,
    }
    _check(lease)
    recorder.succeeded(
        answer=reply.text,
        token_count=len(reply.token_ids),
        history_turns=reply.history_turns,
        **prompt_usage(artifact, reply.prompt_ids, cache["cache_hit"]),
        timeline=[[t, share] for t, share in reply.timeline],
        top_moments=[[t, share] for t, share in reply.top_moments],
        timings=_rounded(timings),
        **cache,
    )


def token_sampling(job: dict) -> TokenSampling:
    """The answer job's sampling parameters (a /v1 chat may set them; absent: greedy, no stop strings)."""
    return TokenSampling(temperature=job.get("temperature") or 0.0, top_p=job.get("top_p") or 1.0,
                         seed=job.get("seed"), stop=tuple(job.get("stop") or ()))  # fmt: skip


def focus_config(settings: Settings) -> FocusConfig:
    """How a focused answer re-reads the video (VIDEOQA_FOCUS_*)."""
    return FocusConfig(moments=settings.focus_moments, window=settings.focus_window_seconds,
                       fps=settings.focus_fps, long_side=settings.focus_long_side)  # fmt: skip


def prompt_usage(artifact: CompressedKV, prompt_ids: list[int], cache_hit: bool) -> dict[str, int]:
    """The answer's prompt in tokens: the cached video (with the text before it; the mean over layers,
    which keep different numbers) and the text after it; `cached_tokens`, the part served from the
    compressed cache on a hit."""
    cached = round(sum(artifact.lengths) / len(artifact.lengths))
    return {"prompt_tokens": cached + len(prompt_ids), "cached_tokens": cached if cache_hit else 0}


# ---- records ------------------------------------------------------------------------------------------


class UploadMissing(Exception):
    code = "upload_missing"


def video_path(rt: WorkerRuntime, video: dict) -> Path:
    """The upload's path: as recorded when absolute, else relative to the data directory."""
    path = Path(video["path"])
    return path if path.is_absolute() else rt.settings.data_dir / path


def cache_identity(video: dict, settings: Settings) -> str:
    """The content hash the video's compressed cache is keyed by: its bytes' sha256 mixed with its tenant, so
    no tenant can learn from a cache hit that another uploaded the same bytes. With
    VIDEOQA_SHARE_CACHE_ACROSS_TENANTS, the bare sha256: identical uploads share one compression."""
    if settings.share_cache_across_tenants:
        return video["sha256"]
    return hashlib.sha256(f"{video['tenant']}\0{video['sha256']}".encode()).hexdigest()


def cache_reason(result: IndexResult) -> str:
    """ "hit:memory", "hit:disk", "miss:absent" or "miss:corrupt": also the cache counter's field."""
    if result.hit:
        return f"hit:{result.tier}"
    return "miss:corrupt" if result.reason.startswith("corrupt") else "miss:absent"


def _video_timings(result: IndexResult) -> dict[str, float]:
    return _video_timings_from(result.seconds)


def _video_timings_from(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per video stage; zeros for the stages a cache hit skipped."""
    return {
        "load": seconds.get("load", 0.0),
        "wait": seconds.get("wait", 0.0),
        "decode": seconds.get("decode", 0.0),
        "preprocess": seconds.get("preprocess", 0.0),  # with decode, in the decoding thread
        "vision": seconds.get("vision", 0.0),
        "video_prefill": seconds.get("prefill", 0.0),
        "compress": seconds.get("compress", 0.0),
        "store": seconds.get("store", 0.0),
    }


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(value, 4) for stage, value in timings.items()}


def _check(lease: Lease | None) -> None:
    if lease is not None:
        lease.check()


@contextlib.contextmanager
def _recording_failures(
    rt: WorkerRuntime, video: dict, recorder: JobRecorder, lease: Lease | None = None
) -> Iterator[None]:
    """Turn what can go wrong inside a task into records. The task then ends normally and the worker takes
    the next message:

        bad upload (VideoDecodeError, missing file)  video and job failed with its code; never retried
        soft time limit (the scheduler's deadline)   job failed, "timeout"
        an answer whose cache can never fit          job failed, "answer_too_large"
        CUDA out of memory                           job failed, "out_of_memory"; the CUDA cache emptied
        anything else (a bug, out of memory)         job failed, "internal_error"; logged with traceback
        disk full (ENOSPC, EDQUOT, EFBIG)            video and job failed, "storage_full"; nothing half-done
        transient Redis errors, Gone, LeaseLost      re-raised: the task retries, or stops quietly
        Cancelled (the worker is shutting down)      re-raised: the lease lapses, the reaper sends it again

    Nothing is written once a newer run holds the job's `lease` (LeaseLost).
    An index job's failure fails its video too (unless the video is ready: then only a rebuild failed).
    """
    try:
        yield
    except (Gone, LeaseLost, Cancelled, *TRANSIENT_ERRORS):
        raise
    except (VideoDecodeError, UploadMissing) as error:
        _check(lease)
        message = str(error).replace(str(video_path(rt, video)), video["filename"])  # no server paths
        recorder.failed(error.code, message, bad_upload=True)
        logger.info("video %s failed: %s (%s)", video["id"], message, error.code)
    except Exception as error:
        _check(lease)
        if isinstance(error, SoftTimeLimitExceeded | RequestTimeout):
            code, message = "timeout", "the task ran past its time limit (VIDEOQA_TASK_TIME_LIMIT)"
        elif isinstance(error, CacheBudgetExceeded):
            code = "answer_too_large"
            message = "the answer's cache exceeds VIDEOQA_SCHEDULER_CACHE_BYTES; ask for fewer max_new_tokens"
        elif isinstance(error, OSError) and error.errno in STORAGE_FULL_ERRNOS:
            code, message = "storage_full", "the data volume is full; free space on it and upload again"
            logger.error("job %s about video %s: %s", recorder.job_id, video["id"], error)
        elif isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()  # give the next task the memory this one was holding
            code, message = "out_of_memory", "the GPU ran out of memory for this video; try a smaller preset"
            logger.exception("job %s about video %s ran out of GPU memory", recorder.job_id, video["id"])
        else:
            code, message = "internal_error", f"the worker failed ({type(error).__name__}); see its log"
            logger.exception("job %s about video %s failed", recorder.job_id, video["id"])
        recorder.failed(code, message)
