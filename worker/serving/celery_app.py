"""The workers' Celery app: Redis as the broker, one GPU queue, settings from VIDEOQA_*.

    celery -A worker.serving.celery_app worker -Q gpu --concurrency 1             (prefork, the default here)
    celery -A worker.serving.celery_app worker -Q gpu --concurrency 1 --pool solo

One worker per GPU, running one task at a time: a task holds the whole GPU (the model plus a video's KV
cache), so more concurrency only adds memory pressure. Several GPUs: one worker each, with
CUDA_VISIBLE_DEVICES. The model is loaded once in the process that runs tasks (`worker_process_init`).

Prefork with one child is the default because only prefork enforces the time limits (Celery's solo pool
ignores them) and a child that crashes (out of memory, a CUDA fault) is replaced while its message is
redelivered. `--pool solo` runs tasks in the worker process itself: simpler to debug, no fork, but a task
can then run past VIDEOQA_TASK_TIME_LIMIT.

This module imports neither torch nor the tasks' code until a worker starts: `include` loads
worker.serving.tasks in the worker only.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from celery import Celery, signals

from service.contract import ANSWER_TASK, GPU_QUEUE, INDEX_TASK, Settings
from worker.serving.allocator import allocator_in_use

logger = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict:
    """Celery settings for long, GPU-bound, idempotent tasks whose state lives in Redis records."""
    limit = settings.task_time_limit
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results are written to Records; no result backend
        "task_default_queue": GPU_QUEUE,
        "task_routes": {INDEX_TASK: {"queue": GPU_QUEUE}, ANSWER_TASK: {"queue": GPU_QUEUE}},
        # A message is acknowledged when its task has finished, so a worker that dies mid-task (OOM kill,
        # lost machine) leaves it to be delivered again; safe because tasks are idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Take one message at a time: a second one prefetched would wait behind an hour of GPU work while
        # another worker sits idle.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "prefork",
        "task_time_limit": limit,
        "task_soft_time_limit": settings.soft_time_limit,  # SoftTimeLimitExceeded: the job fails, "timeout"
        # Redis redelivers a message not acknowledged within the visibility timeout: it must outlast the
        # longest task, or a slow but healthy task would run twice. A worker that dies is noticed much
        # sooner than that: its job lease lapses and the API's reaper sends the job again
        # (service/recovery.py); the late redelivery then finds the job finished and does nothing.
        "broker_transport_options": {"visibility_timeout": limit + 600},
        "broker_connection_retry_on_startup": True,  # wait for Redis at startup instead of exiting
        "broker_connection_max_retries": None,
        # Redis acknowledgements survive a reconnect, so a blip of the broker must not throw away an hour
        # of compression (Celery 6 would cancel by default).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": False,
    }


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    celery = Celery("videoqa", broker=settings.redis_url, include=["worker.serving.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = make_app()


# ---- worker process lifecycle: load the model once, then heartbeat ------------------------------------

_heartbeat = None
_worker_pid: int | None = None  # the worker's main process; prefork children inherit the value


@signals.worker_init.connect
def _on_worker_init(**_) -> None:
    """In the worker's main process, before the pool starts: refuse settings that would fail every task."""
    global _worker_pid
    _worker_pid = os.getpid()
    from worker.serving.runtime import compression_config

    try:
        compression_config(Settings())
    except ValueError as error:
        logger.critical("worker cannot start: %s", error)
        raise SystemExit(1) from error  # celery's signal dispatch would log and swallow an Exception


@signals.worker_process_init.connect
def _on_process_init(sender=None, **_) -> None:
    """In the process that runs tasks (the worker itself with --pool solo, each child with prefork)."""
    # prefork gives this signal a few seconds; loading a 7B model takes longer, so it happens in a thread.
    # Tasks that arrive meanwhile wait for the model (the runtime loads it once, under a lock).
    name = str(sender or f"worker-{os.getpid()}")
    threading.Thread(target=_warm_up_then_beat, args=(name,), name="videoqa-warm-up", daemon=True).start()


def _warm_up_then_beat(name: str) -> None:
    global _heartbeat
    from worker.serving import runtime

    try:
        current = runtime.current()
        current.warm_up()
    except Exception:
        # A wrong model path would fail every task: stop the whole worker, loudly, so that its supervisor
        # (compose, `videoqa serve`) notices, rather than a prefork pool restarting a doomed child forever.
        logger.critical("worker %s cannot start: loading the model failed", name, exc_info=True)
        if _worker_pid is not None and _worker_pid != os.getpid():
            os.kill(_worker_pid, signal.SIGTERM)
        logging.shutdown()
        os._exit(1)
    logger.info("worker %s ready: model loaded, %s, heartbeating every %.0f s", name, allocator_in_use(),
                runtime.HEARTBEAT_SECONDS)  # fmt: skip
    _heartbeat = runtime.Heartbeat(current.records, name).start()


@signals.worker_process_shutdown.connect  # prefork children
@signals.worker_shutdown.connect  # the worker itself (--pool solo)
def _on_process_shutdown(**_) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
