"""Enqueue work for the GPU workers by task NAME: the API never imports worker code (nor torch)."""

from __future__ import annotations

import json

import redis
from celery import Celery

from service.contract import ANSWER_TASK, GPU_QUEUE, INDEX_TASK, Keys, Settings, worker_queue
from service.routing import SHARED, Route, Router

# Kombu's Redis transport keeps one list per priority step: the queue's name for the default priority,
# then name + "\x06\x16" + step. Counting them all is the queue depth.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
# A publish waits at most about a second for the broker, then the request fails with a 503.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}


class TaskQueue:
    """A producer-only Celery app (no result backend): sends index and answer tasks to the GPU queues, asks
    where `router` says (None: the shared queue)."""

    def __init__(self, settings: Settings, router: Router | None = None) -> None:
        self.router = router
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

    def route(self, video: dict) -> Route:
        """Where an ask about `video` (its record) goes."""
        return SHARED if self.router is None else self.router.route(video["id"], video.get("artifact_key"))

    def answer(self, job_id: str, queue: str = GPU_QUEUE) -> None:
        """Answer the question of an answer job (the task's Celery id is the job id) on `queue`: the shared
        one, or a worker's own (service/routing.py)."""
        self._send(ANSWER_TASK, job_id, task_id=job_id, queue=queue)

    def _send(self, name: str, argument: str, *, task_id: str, queue: str = GPU_QUEUE) -> None:
        self.celery.send_task(
            name, args=[argument], queue=queue, task_id=task_id, retry=True, retry_policy=_PUBLISH_RETRY
        )

    @staticmethod
    def lists(client: redis.Redis, keys: Keys) -> list[str]:
        """The Redis lists holding waiting messages: the shared queue's and every known worker's own."""
        queues = [GPU_QUEUE, *map(worker_queue, client.hkeys(keys.worker_states()))]
        return [queue + suffix for queue in queues for suffix in _PRIORITY_SUFFIXES]

    @staticmethod
    def depth(client: redis.Redis, keys: Keys) -> int:
        """Messages waiting in the GPU queues (not counting the ones a worker has reserved)."""
        with client.pipeline(transaction=False) as pipe:
            for name in TaskQueue.lists(client, keys):
                pipe.llen(name)
            return sum(pipe.execute())

    @staticmethod
    def waiting_ids(client: redis.Redis, keys: Keys) -> set[str]:
        """Task ids (= job ids) of the messages waiting in the GPU queues, read from their headers."""
        with client.pipeline(transaction=False) as pipe:
            for name in TaskQueue.lists(client, keys):
                pipe.lrange(name, 0, -1)
            lists = pipe.execute()
        ids = set()
        for message in (raw for messages in lists for raw in messages):
            try:
                ids.add(json.loads(message)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a Celery protocol-2 message: nothing of ours
        return ids

    @staticmethod
    def hand_back(client: redis.Redis, worker: str) -> int:
        """Move the messages waiting in `worker`'s own queue to the shared one, oldest taken first (a dead
        worker's asks are answered by another) -> how many moved."""
        moved = 0
        for suffix in _PRIORITY_SUFFIXES:
            # kombu pushes on the left and takes from the right: moving newest-first onto the right end
            # leaves the oldest where the next worker takes from
            source, target = worker_queue(worker) + suffix, GPU_QUEUE + suffix
            while client.lmove(source, target, "LEFT", "RIGHT") is not None:
                moved += 1
        return moved

    def close(self) -> None:
        self.celery.close()
