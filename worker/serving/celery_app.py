"""The workers' Celery app: Redis as the broker, one GPU queue, settings from VIDEOQA_*.

    celery -A worker.serving.celery_app worker -Q gpu       (a pool of VIDEOQA_WORKER_CONCURRENCY threads)

One worker process per GPU (several GPUs: one worker each, with CUDA_VISIBLE_DEVICES). Its tasks are thin:
they run in threads and submit their model work to the process's one scheduler (worker/engine/scheduler.py),
which owns the model and interleaves indexing with batched answers. So a follow-up does not wait behind a
video being indexed, and answers asked together decode together. With VIDEOQA_WORKER_CONCURRENCY=1 the
worker runs one task at a time, as a serial worker.

Celery's thread pool enforces no time limits: the scheduler ends a task's model work at the task's soft
limit (the job fails with "timeout"). A crash of the process (a CUDA fault, SIGKILL) ends every task it held;
their leases lapse and the API's reaper sends them again (service/recovery.py).

The model is loaded once, in a thread started with the worker (`worker_init`). This module imports neither
torch nor the tasks' code until a worker starts: `include` loads worker.serving.tasks in the worker only.
"""

from __future__ import annotations

import logging
import os
import threading

import redis
from celery import Celery, signals

from service.contract import ANSWER_TASK, GPU_QUEUE, INDEX_TASK, Settings, worker_queue
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
        # Take as many messages as there are threads, no more: a message reserved beyond them would wait
        # while another worker sits idle.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_pool": "threads",
        # Enforced by prefork and solo pools only; in the thread pool the scheduler enforces the soft limit.
        "task_time_limit": limit,
        "task_soft_time_limit": settings.soft_time_limit,
        # Redis redelivers a message not acknowledged within the visibility timeout: it must outlast the
        # longest task, or a slow but healthy task would run twice. A worker that dies is noticed much
        # sooner than that: its job lease lapses and the API's reaper sends the job again
        # (service/recovery.py); the late redelivery then finds the job finished and does nothing.
        "broker_transport_options": {"visibility_timeout": limit + 600},
        "broker_transport": "worker.serving.broker:Transport",  # see there: no restore on a lost connection
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


@signals.celeryd_after_setup.connect
def _take_own_queue(sender=None, instance=None, **_) -> None:
    """Besides the shared queue, the worker takes from a queue of its own: the asks routed to it because it
    holds their video (service/routing.py)."""
    instance.app.amqp.queues.select_add(worker_queue(str(sender)))


@signals.worker_init.connect
def _on_worker_init(sender=None, **_) -> None:
    """In the worker process, before its pool starts: refuse settings that would fail every task, then load
    the model in a thread (a 7B model takes longer than Celery waits for this signal). Tasks that arrive
    meanwhile wait for it (the runtime loads it once, under a lock)."""
    from worker.serving import runtime

    try:
        runtime.compression_config(Settings())
    except ValueError as error:
        logger.critical("worker cannot start: %s", error)
        raise SystemExit(1) from error  # celery's signal dispatch would log and swallow an Exception
    name = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    current = runtime.current()
    current.name = name
    try:
        current.client.hset(current.keys.worker_tasks(), name, 0)  # before the pool starts: none runs yet
    except redis.RedisError as error:
        logger.warning("could not reset the task count for routing: %s", error)
    threading.Thread(target=_warm_up_then_beat, args=(name,), name="videoqa-warm-up", daemon=True).start()


def _warm_up_then_beat(name: str) -> None:
    global _heartbeat
    from worker.serving import runtime

    try:
        current = runtime.current()
        current.warm_up()
    except Exception:
        # A wrong model path would fail every task: stop the whole worker, loudly, so that its supervisor
        # (compose, `videoqa serve`) notices.
        logger.critical("worker %s cannot start: loading the model failed", name, exc_info=True)
        logging.shutdown()
        os._exit(1)
    logger.info("worker %s ready: model loaded, %s, heartbeating every %.0f s", name, allocator_in_use(),
                runtime.HEARTBEAT_SECONDS)  # fmt: skip
    _heartbeat = runtime.Heartbeat(current.records, name, current.state).start()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_) -> None:
    """After the pool's tasks have finished: stop beating, then stop the scheduler."""
    from worker.serving import runtime

    if _heartbeat is not None:
        _heartbeat.stop()
    runtime.current().close()
