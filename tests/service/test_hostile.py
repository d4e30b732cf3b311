"""Inputs that once got a 500 or a wrong answer, each answered now with a 4xx JSON error that loses nothing;
and the HTTP details (HEAD, Allow, CORS, 204, read timeout) that must hold for every client."""

import json
import socket
import threading
import time

import pytest
import uvicorn
import yaml

from service.contract import Settings
from service.main import create_app
from service.openapi import DEFAULT_PATH
from tests.conftest import free_port
from tests.service.helpers import fake_mp4, queued_tasks


@pytest.fixture
def video(client) -> dict:
    return client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()


def error_code(response) -> str:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]["code"]


def test_an_offset_past_redis_range_is_a_422_not_a_500(client):
    response = client.get("/videos", params={"offset": 9223372036854775807})
    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert client.get("/videos", params={"offset": 1_000_000_000}).json()["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        '{"video_id": "VID", "question": "\\ud800"}',  # a lone surrogate: no UTF-8 encoder takes it
        '{"video_id": "VID", "question": "why \\udfff?"}',
        '{"video_id": "\\ud800", "question": "why?"}',
        '{"video_id": "VID", "question": "\\u0000"}',  # only NUL
        '{"video_id": "VID", "question": "why\\u0000?"}',
    ],
)
def test_a_question_that_cannot_be_stored_is_refused_before_any_job_exists(client, settings, video, body):
    response = client.post("/ask", content=body.replace("VID", video["id"]),
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert (response.status_code, error_code(response)) == (422, "validation_error")
    assert [name for name, _, _ in queued_tasks(settings.redis_url)] == ["worker.tasks.index_video"]


@pytest.mark.parametrize("value", ["12", True, 1000.0, 12.5])
def test_max_new_tokens_must_be_an_integer(client, video, value):
    body = {"video_id": video["id"], "question": "why?", "max_new_tokens": value}
    response = client.post("/ask", json=body)
    assert (response.status_code, error_code(response)) == (422, "validation_error")


def test_a_last_event_id_beyond_64_bits_is_a_422_not_a_cut_stream(client, video):
    job = client.post("/ask", json={"video_id": video["id"], "question": "why?"}).json()
    for last in ("99999999999999999999-99999999999999999999", "18446744073709551616-0"):
        response = client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": last})
        assert (response.status_code, error_code(response)) == (422, "validation_error")


def test_405_names_every_method_of_the_path(client, video):
    response = client.put(f"/videos/{video['id']}")
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET, HEAD"
    assert client.delete("/healthz").headers["allow"] == "GET, HEAD"
    assert client.get("/ask").headers["allow"] == "POST"


def test_head_answers_like_get_without_a_body(client, video, records):
    for path in ("/healthz", f"/videos/{video['id']}", "/videos"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]
    assert client.head("/videos/vid_nope").status_code == 404
    job = client.post("/ask", json={"video_id": video["id"], "question": "why?"}).json()
    started = time.monotonic()
    head = client.head(f"/jobs/{job['id']}/events")  # a stream that would run until the job ends
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
    assert time.monotonic() - started < 5


def test_a_refused_cors_preflight_is_json(make_client):
    client = make_client(cors_origins="https://app.example")
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = client.options("/ask", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    refused = client.options("/ask", headers={"Origin": "https://evil.example", **preflight})
    assert (refused.status_code, error_code(refused)) == (400, "cors_rejected")
    assert "origin" in refused.json()["error"]["message"].lower()


def test_delete_answers_204_with_no_body_and_no_content_type(client, video):
    response = client.delete(f"/videos/{video['id']}")
    assert response.status_code == 204 and response.content == b""
    assert "content-type" not in response.headers


def test_an_upload_that_stops_sending_is_answered_408_and_leaves_no_file(settings):
    """Over a real socket to uvicorn (TestClient buffers a request body before the app sees it)."""
    app = create_app(settings.model_copy(update={"upload_idle_timeout_seconds": 0.5}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        boundary = "b0undary"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n"
                "Content-Type: video/mp4\r\n\r\n").encode() + fake_mp4(size=8192)  # fmt: skip
        request = (f"POST /videos HTTP/1.1\r\nHost: x\r\nContent-Length: {len(part) + 1000}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.config.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(request + part)  # ... and then nothing more: the client went silent
            reply = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                reply += chunk
        assert time.monotonic() - started < 5
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "upload_timeout"
        assert not [p for p in settings.uploads_dir.rglob("*") if p.is_file()]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_openapi_states_the_question_limits():
    document = yaml.safe_load(DEFAULT_PATH.read_text())
    ask = document["components"]["schemas"]["AskCreate"]["properties"]
    defaults = Settings()
    assert ask["question"]["minLength"] == 1
    assert ask["question"]["maxLength"] == defaults.max_question_chars
    assert ask["max_new_tokens"]["maximum"] == defaults.max_new_tokens_limit


def test_a_short_task_time_limit_still_leaves_the_task_time_to_work():
    from worker.serving.celery_app import celery_config

    assert Settings(task_time_limit=61).soft_time_limit == pytest.approx(54.9)
    assert Settings(task_time_limit=3600).soft_time_limit == 3540
    assert celery_config(Settings(task_time_limit=20))["task_soft_time_limit"] == 18
    with pytest.raises(ValueError, match="task_time_limit"):
        Settings(task_time_limit=5)


def test_redis_refusing_writes_is_a_503_not_a_500(client, settings):
    import redis

    admin = redis.Redis.from_url(settings.redis_url)
    admin.config_set("min-replicas-to-write", 1)  # Redis now answers NOREPLICAS to every write
    try:
        response = client.post("/videos", files={"file": ("a.mp4", fake_mp4(seed=9), "video/mp4")})
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
    assert (response.status_code, error_code(response)) == (503, "redis_unavailable")
    assert json.loads(response.text)["error"]["message"]
