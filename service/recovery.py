"""The stale-job reaper: no job stays queued or running after the worker that held it died.

A worker holds a lease on each job it runs (`Keys.job_lease`, renewed every few seconds:
worker/serving/leases.py); a job waiting its turn has its message in the GPU queue. A job that has neither, on
two sweeps in a row and for longer than a lease lives, has lost its worker (SIGKILL, a lost machine, a Redis
restart that took the message with it). The reaper then sends its task again, or, after `VIDEOQA_JOB_ATTEMPTS`
recoveries, fails it with code "worker_lost" (an index job fails its video too). Tasks are idempotent, so a
late duplicate of a message (Redis redelivers unacknowledged ones after its visibility timeout) finds the job
finished and does nothing; a duplicate that arrives while the job runs finds its lease taken.

Redis as the broker has no consumer liveness of its own (a message a dead worker took waits for the
visibility timeout, over an hour): this sweep is what gives the guarantee. It runs in every API process
(the API always runs); a short lease on `Keys.reaper()` lets one of them sweep at a time. Torch-free.
"""

from __future__ import annotations

import logging
import secrets
import time

import redis

from service.contract import TERMINAL_JOB_STATES, JobStatus, Settings, VideoStatus
from service.downloads import INTERRUPTED
from service.queue import TaskQueue
from service.records import Records
from service.routing import live_states

logger = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"


class Reaper:
    """One sweep at a time over `Keys.active_jobs()`; `sweep` is called every `reaper_interval_seconds`."""

    def __init__(self, records: Records, queue: TaskQueue, settings: Settings) -> None:
        self.records = records
        self.queue = queue
        self.settings = settings
        self.name = secrets.token_hex(8)
        self._suspects: dict[str, float] = {}  # job id -> when a sweep first found it without a worker

    def sweep(self) -> dict[str, int]:
        """Recover or fail the jobs whose worker is gone -> counts by what was done ({} when another
        process holds the sweep)."""
        client, keys = self.records.client, self.records.keys
        interval = self.settings.reaper_interval_seconds
        if not self._take_sweep(client, keys.reaper(), ttl_ms=max(1, round(interval * 900))):
            return {}
        now = time.time()
        self._hand_back_dead_workers_queues(now)
        waiting = TaskQueue.waiting_ids(client, keys)
        done = {"requeued": 0, "failed": 0}
        suspects = {}
        for job_id in self.records.active_jobs():
            job = self.records.get_job(job_id)
            if job is None or job["status"] in TERMINAL_JOB_STATES:
                client.zrem(keys.active_jobs(), job_id)
                continue
            if job_id in waiting or client.exists(keys.job_lease(job_id)):
                continue
            if now - job["updated_at"] < self.settings.lease_seconds:
                continue  # just created, just handed over, or its lease only now ran out
            first_seen = suspects[job_id] = self._suspects.get(job_id, now)
            if now - first_seen < interval:
                continue  # seen once: a worker may have taken the message an instant ago; look again
            del suspects[job_id]
            done[self._recover(job)] += 1
        self._suspects = suspects
        self._fail_lost_downloads(now)
        if done["requeued"] or done["failed"]:
            logger.warning("stale jobs: %(requeued)d sent again, %(failed)d failed (worker_lost)", done)
        return done

    def _hand_back_dead_workers_queues(self, now: float) -> None:
        """The asks routed to a worker that died wait in its own queue: they go to the shared one, where the
        other workers take them (service/routing.py)."""
        client, key = self.records.client, self.records.keys.worker_states()
        live = live_states(client, self.records.keys, now)
        for worker in client.hkeys(key):
            if worker not in live:
                if moved := TaskQueue.hand_back(client, worker):
                    logger.warning("worker %s is gone: %d queued asks go to the shared queue", worker, moved)
                client.hdel(key, worker)
                client.hdel(self.records.keys.worker_tasks(), worker)

    def _fail_lost_downloads(self, now: float) -> None:
        """Videos still downloading past their deadline: the API process fetching them died."""
        client, key = self.records.client, self.records.keys.downloads()
        for video_id in client.zrangebyscore(key, "-inf", now):
            video = self.records.get_video(video_id)
            if video is not None and video["status"] == VideoStatus.DOWNLOADING:
                code, message = INTERRUPTED
                failed = {"status": VideoStatus.FAILED, "stage": "failed", "error_code": code,
                          "error_message": message}  # fmt: skip
                self.records.update_video(video_id, **failed)
                logger.warning("video %s failed: its download was lost with its API process", video_id)
            client.zrem(key, video_id)

    def _take_sweep(self, client: redis.Redis, key: str, ttl_ms: int) -> bool:
        """The sweep's lease: free, or still ours from the last sweep (taken again if it just lapsed)."""
        take = lambda: client.set(key, self.name, nx=True, px=ttl_ms)  # noqa: E731
        return bool(take() or client.get(key) == self.name or take())

    def _recover(self, job: dict) -> str:
        recoveries = int(job.get("recoveries") or 0)
        if recoveries >= self.settings.job_attempts:
            self._fail(job, f"the worker running this job stopped {recoveries + 1} times; ask again")
            return "failed"
        # The message first: once it waits in the queue, a failure below leaves nothing stale behind.
        if job["kind"] == "index":
            self.queue.index(job["video_id"], job["id"])
        else:
            self.queue.answer(job["id"])
        if self.records.update_job(job["id"], status=JobStatus.QUEUED, recoveries=recoveries + 1):
            self.records.append_event(job["id"], "status", {"status": JobStatus.QUEUED.value})
        logger.warning("job %s lost its worker: sent again (recovery %d)", job["id"], recoveries + 1)
        return "requeued"

    def _fail(self, job: dict, message: str) -> None:
        fields = {"error_code": WORKER_LOST, "error_message": message}
        if not self.records.update_job(job["id"], status=JobStatus.FAILED, finished_at=time.time(), **fields):
            return
        done = {"status": JobStatus.FAILED.value, "error_code": WORKER_LOST}
        self.records.append_event(job["id"], "done", done)
        if job["kind"] == "index":
            video = self.records.get_video(job["video_id"])
            if video is not None and video["status"] != VideoStatus.READY:
                self.records.update_video(video["id"], status=VideoStatus.FAILED, stage="failed", **fields)
        logger.warning("job %s failed: %s", job["id"], message)

    def run(self, stopping) -> None:
        """Sweep every interval until `stopping` (a threading.Event) is set; a Redis error skips a sweep."""
        while not stopping.wait(self.settings.reaper_interval_seconds):
            try:
                self.sweep()
            except redis.RedisError as error:
                logger.info("stale-job sweep skipped: %s", error)
            except Exception:
                logger.exception("stale-job sweep failed")
