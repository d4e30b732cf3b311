"""GET /jobs/{id}: the result shape and the long-poll; GET /jobs/{id}/events: Server-Sent Events framing."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.contract import JobStatus
from service.routers import jobs as jobs_router
from tests.helpers import parse_sse
from tests.service.conftest import ALICE, BOB
from tests.service.helpers import fake_mp4


@pytest.fixture
def job(client) -> dict:
    video = client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()
    return client.post("/ask", json={"video_id": video["id"], "question": "What happens?"}).json()


def finish(records, job_id: str, delay: float = 0.0) -> threading.Timer:
    """Play the worker finishing the job after `delay`: record first, then the events readers wake on."""

    def run():
        records.update_job(
            job_id, status=JobStatus.SUCCEEDED, answer="A rabbit.", token_count=3, cache_hit=True,
            cache_tier="memory", cache_reason="artifact in memory", timings={"decode_tokens": 0.3},
            timeline=[[0.0, 0.1], [0.5, 0.9]], top_moments=[{"t": 0.5, "share": 0.9}],
            finished_at=time.time(),
        )  # fmt: skip
        records.append_event(job_id, "status", {"status": "succeeded"})
        records.append_event(job_id, "done", {"status": "succeeded"})

    timer = threading.Timer(delay, run)
    timer.start()
    return timer


def test_a_finished_job_carries_answer_cache_timings_and_evidence(client, job, records):
    finish(records, job["id"]).join()
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["answer"] == "A rabbit." and done["token_count"] == 3
    assert done["cache"] == {"hit": True, "tier": "memory", "reason": "artifact in memory", "reread": None}
    assert done["timings"] == {"decode_tokens": 0.3}
    assert done["evidence"] == {
        "timeline": [[0.0, 0.1], [0.5, 0.9]],
        "top_moments": [{"t": 0.5, "share": 0.9}],
        "moments": [],  # only [seconds, share] pairs of the timeline become moments
    }
    assert done["error"] is None and done["finished_at"] is not None


def test_a_failed_job_carries_its_error(client, job, records):
    records.update_job(
        job["id"], status=JobStatus.FAILED, error_code="decode_error", error_message="moov atom not found"
    )
    failed = client.get(f"/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "decode_error",
        "message": "moov atom not found",
    }


def test_long_poll_returns_as_soon_as_the_job_finishes(client, job, records):
    records.append_event(job["id"], "status", {"status": "running"})  # an old event must not wake it
    started = time.monotonic()
    timer = finish(records, job["id"], delay=0.5)
    response = client.get(f"/jobs/{job['id']}", params={"wait": 20})
    elapsed = time.monotonic() - started
    timer.join()
    assert response.json()["status"] == "succeeded" and response.json()["answer"] == "A rabbit."
    assert 0.4 < elapsed < 5


def test_long_poll_keeps_waiting_through_progress_and_returns_at_the_deadline(client, job, records):
    def progress():
        records.update_job(job["id"], status=JobStatus.RUNNING)
        records.append_event(job["id"], "status", {"status": "running"})
        for index in range(5):
            records.append_event(job["id"], "token", {"text": f"t{index}"})
            time.sleep(0.05)

    timer = threading.Timer(0.1, progress)
    timer.start()
    started = time.monotonic()
    response = client.get(f"/jobs/{job['id']}", params={"wait": 1.0})
    elapsed = time.monotonic() - started
    timer.join()
    assert response.json()["status"] == "running" and 0.9 < elapsed < 5


@pytest.mark.slow
def test_a_long_poll_survives_a_quiet_wait_longer_than_redis_read_timeouts(client, job, records):
    """Nothing happens for 7 s: longer than redis-py's default socket read timeout (5 s)."""
    timer = finish(records, job["id"], delay=7)
    response = client.get(f"/jobs/{job['id']}", params={"wait": 20})
    timer.join()
    assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text


def test_long_poll_is_capped(make_client, records):
    client = make_client(long_poll_max_seconds=0.3)
    video = client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()
    started = time.monotonic()
    index_job = client.get(video["links"]["index_job"], params={"wait": 30}).json()
    assert index_job["status"] == "queued" and time.monotonic() - started < 3
    bad = client.get(video["links"]["index_job"], params={"wait": -1})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_waiting_long_polls_hold_no_thread(client, job, records):
    # More waiters than the threadpool has threads (40): a sync route must still answer at once.
    with ThreadPoolExecutor(60) as pool:
        waits = [pool.submit(client.get, f"/jobs/{job['id']}", params={"wait": 10}) for _ in range(60)]
        time.sleep(1.0)
        started = time.monotonic()
        assert client.get("/videos").status_code == 200
        assert time.monotonic() - started < 1.0
        assert not any(wait.done() for wait in waits)
        finish(records, job["id"]).join()
        assert all(wait.result(timeout=10).json()["status"] == "succeeded" for wait in waits)


def test_unknown_job(client):
    for path in ("/jobs/job_nope", "/jobs/job_nope?wait=1", "/jobs/job_nope/events"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_events_are_server_sent_events_that_end_after_done(client, job, records):
    ids = [
        records.append_event(job["id"], "status", {"status": "running"}),
        records.append_event(job["id"], "progress", {"stage": "prefilling", "progress": 0.5}),
        records.append_event(job["id"], "token", {"text": "A"}),
        records.append_event(job["id"], "token", {"text": " rabbit."}),
        records.append_event(job["id"], "done", {"status": "succeeded"}),
    ]
    response = client.get(f"/jobs/{job['id']}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events, _ = parse_sse(response.text)
    assert [e["event"] for e in events] == ["status", "progress", "token", "token", "done"]
    assert [e["id"] for e in events] == ids
    assert events[1]["data"] == '{"stage": "prefilling", "progress": 0.5}'
    assert response.text.startswith(f"id: {ids[0]}\nevent: status\ndata: ")

    resumed, _ = parse_sse(client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": ids[2]}).text)
    assert [e["id"] for e in resumed] == ids[3:]
    bad = client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": "nonsense"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_events_stream_live_with_keep_alives(client, job, records, monkeypatch):
    monkeypatch.setattr(jobs_router, "SSE_KEEPALIVE_S", 0.2)

    def work():
        time.sleep(0.5)
        for text in ("A", " rabbit."):
            records.append_event(job["id"], "token", {"text": text})
        finish(records, job["id"]).join()

    worker = threading.Thread(target=work)
    worker.start()
    lines = []
    with client.stream("GET", f"/jobs/{job['id']}/events") as response:
        for line in response.iter_lines():
            lines.append(line)
    worker.join()
    events, comments = parse_sse("\n".join(lines))
    assert comments and all(c == ": keep-alive" for c in comments)
    assert [e["event"] for e in events] == ["token", "token", "status", "done"]


def test_a_stream_ends_when_the_job_ends_without_a_done_event(client, job, records, monkeypatch):
    monkeypatch.setattr(jobs_router, "SSE_KEEPALIVE_S", 0.1)
    records.update_job(
        job["id"], status=JobStatus.FAILED, error_code="worker_lost", error_message="worker died"
    )
    events, _ = parse_sse(client.get(f"/jobs/{job['id']}/events").text)
    assert events == [{"event": "done", "data": '{"status": "failed"}'}]


def test_another_tenants_job_is_not_found(tenants_client):
    video = tenants_client.post(
        "/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}, headers=ALICE
    ).json()
    job = tenants_client.post(
        "/ask", json={"video_id": video["id"], "question": "Who?"}, headers=ALICE
    ).json()
    for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/events", f"/jobs/{job['id']}?wait=0.1"):
        assert tenants_client.get(path, headers=BOB).status_code == 404
    assert tenants_client.get(f"/jobs/{job['id']}", headers=ALICE).status_code == 200
