"""JobRecorder against the test's own redis-server: what a task run writes for its job and its video."""

import time

import pytest
import redis

from service.contract import Keys
from service.records import Records
from worker.serving import recorder as recorder_module
from worker.serving.recorder import PROGRESS_INTERVAL, TOKEN_FLUSH_SECONDS, Gone, JobRecorder


class Clock:
    """The recorder's `time`, with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


@pytest.fixture
def records(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield Records(client, Keys("t"))
    client.close()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(recorder_module, "time", clock)
    return clock


def indexing(records: Records) -> tuple[dict, str]:
    """A queued video and its index job, as the API leaves them after an upload."""
    video, _ = records.create_video(tenant="a", sha256="ab" * 32, filename="clip.mp4", size_bytes=1,
                                    path="/data/clip.mp4", container="mp4")  # fmt: skip
    job = records.create_job(tenant="a", video_id=video["id"], kind="index")
    records.update_video(video["id"], index_job_id=job["id"])
    return records.get_video(video["id"]), job["id"]


def events(records: Records, job_id: str) -> list[tuple[str, dict]]:
    return [(kind, data) for _, kind, data in records.read_events(job_id, count=1000)]


def test_progress_never_moves_backwards_and_is_throttled_within_a_stage(records, clock):
    video, job_id = indexing(records)
    progress = JobRecorder(records, job_id, video).progress(track_video=True)
    progress("decoding", 0.0)  # a new status: written
    progress("encoding", 0.5)  # a new status: written
    progress("encoding", 0.6)  # same stage, too soon: not written
    progress("decoding", 0.9)  # decoding runs on behind encoding: the status stays "encoding"
    clock.now += PROGRESS_INTERVAL
    progress("encoding", 0.8)  # the interval passed: written
    progress("encoding", 1.0)  # a stage's end: always written
    progress("prefilling", 1.0)

    assert events(records, job_id) == [
        ("progress", {"stage": "decoding", "progress": 0.0}),
        ("progress", {"stage": "encoding", "progress": 0.25}),
        ("progress", {"stage": "encoding", "progress": 0.4}),
        ("progress", {"stage": "encoding", "progress": 0.5}),
        ("progress", {"stage": "prefilling", "progress": 1.0}),
    ]
    after = records.get_video(video["id"])
    assert (after["status"], after["stage"], after["progress"]) == ("prefilling", "prefilling", 1.0)


def test_progress_of_a_question_guided_compression_leaves_the_video_alone(records, clock):
    video, job_id = indexing(records)
    JobRecorder(records, job_id, video).progress(track_video=False)("encoding", 0.5)
    assert events(records, job_id) == [("progress", {"stage": "encoding", "progress": 0.25})]
    assert records.get_video(video["id"])["status"] == "queued"


def test_tokens_are_streamed_in_batches(records, clock):
    video, job_id = indexing(records)
    stream = JobRecorder(records, job_id, video).token_stream()
    stream("A")
    stream(" cat")  # within TOKEN_FLUSH_SECONDS of the start: held
    clock.now += TOKEN_FLUSH_SECONDS
    stream(" sits")  # the batch is old enough: written
    stream(".")
    stream.flush()  # the answer's end
    stream.flush()  # nothing left: nothing written
    assert events(records, job_id) == [("token", {"text": "A cat sits"}), ("token", {"text": "."})]


def test_statuses_and_the_end_are_written_record_first_then_event(records):
    video, job_id = indexing(records)
    recorder = JobRecorder(records, job_id, video)
    recorder.running(started_at=12.0)
    recorder.waiting_for_index()
    recorder.running()
    recorder.succeeded(cache_hit=True)

    job = records.get_job(job_id)
    assert job["status"] == "succeeded" and job["started_at"] == 12.0 and job["cache_hit"] is True
    assert job["finished_at"] >= job["started_at"]
    assert events(records, job_id) == [
        ("status", {"status": "running"}),
        ("status", {"status": "waiting_for_index"}),
        ("status", {"status": "running"}),
        ("done", {"status": "succeeded"}),
    ]


def test_a_failure_fails_the_video_only_for_its_index_job_while_it_is_not_ready(records):
    video, index_job = indexing(records)
    answer_job = records.create_job(tenant="a", video_id=video["id"], kind="answer")["id"]
    JobRecorder(records, answer_job, video).failed("internal_error", "boom")
    assert records.get_video(video["id"])["status"] == "queued"
    assert events(records, answer_job) == [("done", {"status": "failed", "error_code": "internal_error"})]

    records.update_video(video["id"], status="ready")  # a rebuild after eviction fails: still ready
    JobRecorder(records, index_job, records.get_video(video["id"])).failed("timeout", "slow")
    assert records.get_video(video["id"])["status"] == "ready"

    records.update_video(video["id"], status="queued")
    JobRecorder(records, index_job, records.get_video(video["id"])).failed("timeout", "slow")
    failed = records.get_video(video["id"])
    assert (failed["status"], failed["error_code"], failed["error_message"]) == ("failed", "timeout", "slow")
    job = records.get_job(index_job)
    assert (job["status"], job["error_code"], job["error_message"]) == ("failed", "timeout", "slow")


def test_a_bad_upload_fails_the_video_whichever_job_found_it(records):
    video, _ = indexing(records)
    answer_job = records.create_job(tenant="a", video_id=video["id"], kind="answer")["id"]
    JobRecorder(records, answer_job, video).failed("upload_missing", "gone", bad_upload=True)
    assert records.get_video(video["id"])["error_code"] == "upload_missing"
    assert records.get_job(answer_job)["status"] == "failed"


def test_writes_after_a_deletion_raise_gone(records, clock):
    video, job_id = indexing(records)
    recorder = JobRecorder(records, job_id, video)
    stream = recorder.token_stream()
    stream("A")
    records.delete_video(video["id"])  # the video and its jobs
    with pytest.raises(Gone):
        recorder.progress(track_video=True)("decoding", 0.0)
    with pytest.raises(Gone):
        recorder.progress(track_video=False)("decoding", 0.0)  # the job's events alone
    with pytest.raises(Gone):
        stream.flush()
    with pytest.raises(Gone):
        recorder.video_ready(frames=10)
    recorder.running()  # the status and the end find no record, and write none
    recorder.failed("internal_error", "boom")
    assert records.get_video(video["id"]) is None and records.get_job(job_id) is None
