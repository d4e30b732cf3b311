"""The stale-job reaper against a real Redis and the real queue: a job nobody holds and nobody waits for is
sent again, then failed with worker_lost; a job with a live lease or a waiting message is left alone."""

import time

import pytest

from service.contract import ANSWER_TASK, INDEX_TASK, JobStatus, VideoStatus
from service.queue import TaskQueue
from service.recovery import Reaper
from tests.service.helpers import queued_tasks


@pytest.fixture
def reaper(settings, records):
    fast = {"lease_seconds": 1.0, "reaper_interval_seconds": 0.2, "job_attempts": 2}
    quick = settings.model_copy(update=fast)
    queue = TaskQueue(quick)
    yield Reaper(records, queue, quick)
    queue.close()


def orphan(records, kind: str = "answer", status: JobStatus = JobStatus.RUNNING) -> tuple[dict, dict]:
    """A video and a job a worker started and then died on: no lease, no message."""
    video, _ = records.create_video(tenant="alice", sha256="ab" * 32, filename="a.mp4", size_bytes=1,
                                    path="/data/a.mp4", container="mp4")  # fmt: skip
    job = records.create_job(tenant="alice", video_id=video["id"], kind=kind, question="why?")
    records.update_video(video["id"], index_job_id=job["id"] if kind == "index" else None,
                         status=VideoStatus.DECODING)  # fmt: skip
    records.update_job(job["id"], status=status)
    return video, job


def sweep_until(reaper, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reaper.sweep().get(what):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no sweep {what} a job")


def test_a_job_whose_worker_died_is_sent_again_then_failed(reaper, records, settings):
    video, job = orphan(records)
    assert reaper.sweep() == {"requeued": 0, "failed": 0}  # its lease may only just have lapsed
    sweep_until(reaper, "requeued")
    assert [(name, args, task_id) for name, args, task_id in queued_tasks(settings.redis_url)] == [
        (ANSWER_TASK, [job["id"]], job["id"])
    ]
    again = records.get_job(job["id"])
    assert (again["status"], again["recoveries"]) == ("queued", 1)
    assert reaper.sweep() == {"requeued": 0, "failed": 0}  # its message waits in the queue: leave it

    records.client.delete("gpu")  # the worker that took it died too, twice
    records.update_job(job["id"], status=JobStatus.RUNNING, recoveries=2)
    sweep_until(reaper, "failed")
    failed = records.get_job(job["id"])
    assert (failed["status"], failed["error_code"]) == ("failed", "worker_lost")
    assert [kind for _, kind, _ in records.read_events(job["id"])][-1] == "done"
    assert job["id"] not in records.active_jobs()


def test_a_lost_index_job_fails_its_video_too(reaper, records):
    video, job = orphan(records, kind="index")
    records.update_job(job["id"], recoveries=2)
    sweep_until(reaper, "failed")
    failed = records.get_video(video["id"])
    assert (failed["status"], failed["error_code"]) == ("failed", "worker_lost")


def test_a_lost_queued_index_job_is_sent_again_by_name(reaper, records, settings):
    video, job = orphan(records, kind="index", status=JobStatus.QUEUED)  # its message was lost with Redis
    sweep_until(reaper, "requeued")
    assert queued_tasks(settings.redis_url) == [(INDEX_TASK, [video["id"]], job["id"])]


def test_a_job_with_a_live_lease_is_left_alone(reaper, records, settings):
    _, job = orphan(records)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        records.client.set(records.keys.job_lease(job["id"]), "1", px=1000)  # a worker renewing it
        assert reaper.sweep() == {"requeued": 0, "failed": 0}
        time.sleep(0.1)
    assert records.get_job(job["id"])["status"] == "running" and not queued_tasks(settings.redis_url)


def test_one_reaper_sweeps_at_a_time(reaper, records, settings):
    other = Reaper(records, reaper.queue, reaper.settings)
    assert reaper.sweep() == {"requeued": 0, "failed": 0}
    assert other.sweep() == {}


def test_a_download_past_its_deadline_fails_and_one_still_in_time_is_left(reaper, records):
    lost = records.create_download(
        tenant="alice", url="http://x/a.mp4", filename="a.mp4", deadline=time.time() - 1
    )
    running = records.create_download(tenant="alice", url="http://x/b.mp4", filename="b.mp4",
                                      deadline=time.time() + 600)  # fmt: skip
    reaper.sweep()
    failed = records.get_video(lost["id"])
    assert (failed["status"], failed["error_code"]) == ("failed", "url_interrupted")
    assert records.get_video(running["id"])["status"] == "downloading"
    assert records.client.zrange(records.keys.downloads(), 0, -1) == [running["id"]]
