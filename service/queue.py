"""Enqueue work for the GPU workers by task NAME: the API never imports worker code (nor torch)."""

from __future__ import annotations

import json

import redis
from celery import Celery

from service.contract import ANSWER_TASK, GPU_QUEUE, INDEX_TASK, Settings

# Kombu's Redis transport keeps one list per priority step: the queue's name for the default priority,
# then name + "\x06\x16" + step. Counting them all is the queue depth.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
# A publish waits at most about a second for the broker, then the request fails with a 503.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}


class TaskQueue:
    """A producer-only Celery app (no result backend): sends index and answer tasks to the GPU queue."""

    def __init__(self, settings: Settings) -> None:
        self.celery = Celery("videoqa-api", broker=settings.redis_url, set_as_current=False)
        self.celery.conf.update(
            task_default_queue=GPU_QUEUE,
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=2,
        )

    def index(self, video_id: str, job_id: str) -> None:
        """Compress the video (the task's Celery id is its index job's id)."""
        self._send(INDEX_TASK, video_id, task_id=job_id)

    def answer(self, job_id: str) -> None:
        """Answer the question of an answer job (the task's Celery id is the job id)."""
        self._send(ANSWER_TASK, job_id, task_id=job_id)

    def _send(self, name: str, argument: str, *, task_id: str) -> None:
        self.celery.send_task(
            name, args=[argument], queue=GPU_QUEUE, task_id=task_id, retry=True, retry_policy=_PUBLISH_RETRY
        )

    @staticmethod
    def depth(client: redis.Redis) -> int:
        """Messages waiting in the GPU queue (not counting the ones a worker has reserved)."""
        with client.pipeline(transaction=False) as pipe:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.llen(GPU_QUEUE + suffix)
            return sum(pipe.execute())

    @staticmethod
    def waiting_ids(client: redis.Redis) -> set[str]:
        """Task ids (= job ids) of the messages waiting in the GPU queue, read from their headers."""
        with client.pipeline(transaction=False) as pipe:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.lrange(GPU_QUEUE + suffix, 0, -1)
            lists = pipe.execute()
        ids = set()
        for message in (raw for messages in lists for raw in messages):
            try:
                ids.add(json.loads(message)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a Celery protocol-2 message: nothing of ours
        return ids

    def close(self) -> None:
        self.celery.close()
