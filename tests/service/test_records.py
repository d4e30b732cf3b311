"""Records against the test's own redis-server: round-trips, dedupe under concurrency, tenants, deletion."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from service.contract import JobStatus, Keys, VideoStatus
from service.records import Records


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def records(client) -> Records:
    return Records(client, Keys("t"))


def make_video(records: Records, tenant="alice", sha256="ab" * 32, **overrides):
    fields = dict(filename="clip.mp4", size_bytes=123, path="/data/uploads/x.mp4", container="mp4")
    return records.create_video(tenant=tenant, sha256=sha256, **{**fields, **overrides})


def keys_under(client, pattern: str) -> list[str]:
    return sorted(client.scan_iter(match=pattern, count=1000))


def test_video_round_trips_types(records):
    video, created = make_video(records)
    assert created and video["id"].startswith("vid_") and len(video["id"]) > 20
    assert video["status"] == VideoStatus.QUEUED and video["progress"] == 0.0 and video["duration"] is None

    assert records.update_video(video["id"], status=VideoStatus.READY, progress=1.0, frames=12, duration=6.5)
    stored = records.get_video(video["id"])
    assert stored["status"] == "ready" and stored["progress"] == 1.0 and stored["frames"] == 12
    assert stored["duration"] == 6.5 and stored["artifact_key"] is None and stored["size_bytes"] == 123
    assert stored["updated_at"] >= stored["created_at"]


def test_same_tenant_same_bytes_is_one_video_even_under_concurrency(records):
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: make_video(records), range(32)))
    ids = {video["id"] for video, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    assert records.list_videos("alice", offset=0, limit=100)[1] == 1
    assert records.counters("videos") == {"queued": 1.0}


def test_a_failed_video_does_not_dedupe_a_retry(records):
    first, _ = make_video(records)
    records.update_video(first["id"], status=VideoStatus.FAILED, error_code="decode_error")
    retry, created = make_video(records)
    assert created and retry["id"] != first["id"]
    records.delete_video(first["id"])  # deleting the failed one keeps the retry's dedupe entry
    again, created = make_video(records)
    assert not created and again["id"] == retry["id"]


def test_tenants_are_isolated(records):
    alice, _ = make_video(records, tenant="alice")
    bob, created = make_video(records, tenant="bob")
    assert created and bob["id"] != alice["id"]
    assert records.get_video(alice["id"], tenant="bob") is None
    assert records.get_video(alice["id"], tenant="alice")["id"] == alice["id"]
    assert records.get_video(alice["id"])["tenant"] == "alice"  # workers: no tenant check
    job = records.create_job(tenant="alice", video_id=alice["id"], kind="answer", question="why?")
    assert records.get_job(job["id"], tenant="bob") is None
    assert records.get_job(job["id"], tenant="alice")["question"] == "why?"
    assert [v["id"] for v in records.list_videos("bob", offset=0, limit=10)[0]] == [bob["id"]]


def test_list_is_newest_first_and_paginated(records):
    ids = []
    for index in range(5):
        ids.append(make_video(records, sha256=f"{index:064x}")[0]["id"])
        time.sleep(0.002)
    page, total = records.list_videos("alice", offset=1, limit=2)
    assert total == 5 and [v["id"] for v in page] == [ids[3], ids[2]]
    assert records.list_videos("alice", offset=10, limit=2) == ([], 5)


def test_updates_and_events_never_resurrect_a_deleted_record(records, client):
    video, _ = make_video(records)
    job = records.create_job(tenant="alice", video_id=video["id"], kind="index")
    assert records.append_event(job["id"], "progress", {"progress": 0.5})
    deleted = records.delete_video(video["id"])
    assert deleted["id"] == video["id"]
    assert records.update_video(video["id"], status=VideoStatus.READY) is False
    assert records.update_job(job["id"], status=JobStatus.SUCCEEDED) is False
    assert records.append_event(job["id"], "done", {}) is None
    assert records.get_video(video["id"]) is None and records.get_job(job["id"]) is None
    assert keys_under(client, "t:video:*") == [] and keys_under(client, "t:job:*") == []
    with pytest.raises(LookupError):
        records.create_job(tenant="alice", video_id=video["id"], kind="answer")
    assert records.delete_video(video["id"]) is None


def test_delete_leaves_no_key_behind(records, client):
    keep, _ = make_video(records, sha256="cd" * 32)
    video, _ = make_video(records)
    for kind in ("index", "answer", "answer"):
        job = records.create_job(tenant="alice", video_id=video["id"], kind=kind)
        records.append_event(job["id"], "status", {"status": "running"})
        records.update_job(job["id"], status=JobStatus.RUNNING)
    before = set(keys_under(client, "t:*"))
    records.delete_video(video["id"])
    after = set(keys_under(client, "t:*"))
    gone = before - after
    assert all(
        video["id"] in key or key.startswith("t:job:") or "sha:" + "ab" * 32 in key or key == "t:jobs:active"
        for key in gone
    )  # the reaper's set of unfinished jobs goes with its last member
    # only the other video, the listing, the gauges and the kept sha remain
    assert after == {
        f"t:video:{keep['id']}", "t:tenant:alice:videos", f"t:tenant:alice:sha:{'cd' * 32}",
        "t:metrics:videos", "t:metrics:jobs",
    }  # fmt: skip
    assert not [key for key in after if video["id"] in key]
    assert records.counters("jobs") == {"queued": 0.0, "running": 0.0}
    assert records.counters("videos") == {"queued": 1.0}


def test_status_gauges_follow_transitions(records):
    video, _ = make_video(records)
    job = records.create_job(tenant="alice", video_id=video["id"], kind="answer")
    records.update_job(job["id"], status=JobStatus.RUNNING)
    records.update_job(job["id"], status=JobStatus.RUNNING, answer="partial")  # same status: no change
    records.update_job(job["id"], status=JobStatus.SUCCEEDED, answer="done")
    records.update_video(video["id"], status=VideoStatus.DECODING)
    assert records.counters("jobs") == {"queued": 0.0, "running": 0.0, "succeeded": 1.0}
    assert records.counters("videos") == {"queued": 0.0, "decoding": 1.0}


def test_events_round_trip_and_block(records):
    video, _ = make_video(records)
    job = records.create_job(tenant="alice", video_id=video["id"], kind="answer", mode="cached")
    assert records.last_event_id(job["id"]) == "0-0"
    first = records.append_event(job["id"], "token", {"text": "Hel"})
    records.append_event(job["id"], "token", {"text": "lo"})
    events = records.read_events(job["id"])
    assert [(kind, data) for _, kind, data in events] == [
        ("token", {"text": "Hel"}),
        ("token", {"text": "lo"}),
    ]
    assert events[0][0] == first and records.last_event_id(job["id"]) == events[1][0]
    assert records.read_events(job["id"], after=first)[0][2] == {"text": "lo"}

    last = records.last_event_id(job["id"])
    assert records.read_events(job["id"], after=last, block_ms=50) == []
    timer = threading.Timer(0.2, records.append_event, args=(job["id"], "done", {"status": "succeeded"}))
    timer.start()
    started = time.monotonic()
    events = records.read_events(job["id"], after=last, block_ms=5000)
    assert [kind for _, kind, _ in events] == ["done"] and time.monotonic() - started < 3
    timer.join()


def test_heartbeats_and_counters(records, client):
    assert records.live_workers() == []
    records.heartbeat("gpu-0")
    client.hset("t:workers", "stale", time.time() - 120)
    assert records.live_workers() == ["gpu-0"]
    records.incr_counter("cache", "hit:memory")
    records.incr_counter("cache", "hit:memory", 2)
    records.incr_counter("cache", "miss:none")
    assert records.counters("cache") == {"hit:memory": 3.0, "miss:none": 1.0}


def index_artifact(client, name: str, size: int) -> None:
    """What the workers' disk tier does when it writes an artifact (worker/serving/tiers.py)."""
    client.hset(f"t:artifact:{name}", mapping={"bytes": json.dumps(size), "tier": json.dumps("disk")})
    client.zadd("t:artifacts:lru", {name: time.time()})
    client.hincrbyfloat("t:metrics:artifact_bytes", "disk", size)


def test_artifact_is_released_only_by_its_last_user(records, client):
    name = "v1/abc/rev/settings"
    index_artifact(client, name, 1000)
    first, _ = make_video(records, tenant="alice")
    second, _ = make_video(records, tenant="bob")
    for video in (first, second):
        assert records.update_video(video["id"], artifact_key=name, status=VideoStatus.READY)
    assert client.smembers(f"t:artifact:{name}:videos") == {first["id"], second["id"]}

    assert records.release_artifact(name, first["id"]) is False
    assert records.release_artifact(name, second["id"]) is True
    assert records.counters("artifact_bytes") == {"disk": 0.0}
    assert keys_under(client, "t:artifact*") == []


def test_an_artifact_being_rebuilt_is_not_released(records, client):
    index_artifact(client, "v1/x/rev/s", 10)
    client.set("t:lock:v1/x/rev/s", "worker-1", px=10_000)
    assert records.release_artifact("v1/x/rev/s", "vid_gone") is False
    assert client.exists("t:artifact:v1/x/rev/s")
