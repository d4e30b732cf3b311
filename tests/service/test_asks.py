"""POST /ask: a queued answer job, enqueued by name; every way a question can be refused."""

import pytest

from service.contract import ANSWER_TASK, INDEX_TASK, VideoStatus
from tests.service.helpers import fake_mp4, queued_tasks


@pytest.fixture
def video(client) -> dict:
    return client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_ask_creates_a_job_and_enqueues_it_by_name(client, settings, video):
    body = {"video_id": video["id"], "question": "  What is the rabbit holding?  ", "max_new_tokens": 32}
    response = client.post("/ask", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}" and int(response.headers["retry-after"]) > 0
    assert job["status"] == "queued" and job["kind"] == "answer" and job["video_id"] == video["id"]
    assert job["question"] == "What is the rabbit holding?" and job["mode"] == "cached"
    assert job["max_new_tokens"] == 32 and job["answer"] is None and job["cache"] is None
    assert job["id"].startswith("job_") and job["links"]["events"] == f"/jobs/{job['id']}/events"
    assert [(name, args) for name, args, _ in queued_tasks(settings.redis_url)] == [
        (INDEX_TASK, [video["id"]]),
        (ANSWER_TASK, [job["id"]]),
    ]
    guided = client.post("/ask", json={**body, "mode": "question_guided"}).json()
    assert guided["mode"] == "question_guided" and client.get(f"/jobs/{guided['id']}").json() == guided


def test_a_video_still_indexing_can_be_asked_about(client, video, records):
    records.update_video(video["id"], status=VideoStatus.ENCODING, progress=0.4)
    assert client.post("/ask", json={"video_id": video["id"], "question": "why?"}).status_code == 202


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"question": "  \n\t "}, 422, "question_empty"),
        ({"question": ""}, 422, "question_empty"),
        ({"question": "x" * 11}, 422, "question_too_long"),
        ({"video_id": "vid_nope"}, 404, "not_found"),
        ({"max_new_tokens": 0}, 422, "validation_error"),
        ({"max_new_tokens": 65}, 422, "validation_error"),
        ({"mode": "uncompressed"}, 422, "validation_error"),
        ({"question": None}, 422, "validation_error"),
        ({"surprise": 1}, 422, "validation_error"),
    ],
)
def test_bad_questions(make_client, body, status, code):
    client = make_client(max_question_chars=10, max_new_tokens_limit=64)
    video = client.post("/videos", files={"file": ("a.mp4", fake_mp4(), "video/mp4")}).json()
    response = client.post("/ask", json={"video_id": video["id"], "question": "who?", **body})
    assert (response.status_code, error_code(response)) == (status, code), response.text
    assert "Traceback" not in response.text


def test_malformed_json(client):
    response = client.post(
        "/ask", content=b'{"video_id": "vid_x", "question": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and error_code(response) == "malformed_json"
    missing = client.post("/ask", json={"question": "who?"})
    assert missing.status_code == 422 and "video_id" in missing.json()["error"]["message"]


def test_a_huge_body_is_refused(client, video):
    response = client.post("/ask", json={"video_id": video["id"], "question": "x" * (2 << 20)})
    assert response.status_code == 413 and error_code(response) == "payload_too_large"


def test_a_failed_video_cannot_be_asked_about(client, video, records):
    records.update_video(
        video["id"], status=VideoStatus.FAILED, error_code="no_video_stream", error_message="audio only"
    )
    response = client.post("/ask", json={"video_id": video["id"], "question": "why?"})
    assert response.status_code == 409 and error_code(response) == "video_failed"
    failed = client.get(f"/videos/{video['id']}").json()
    assert failed["error"] == {"code": "no_video_stream", "message": "audio only"}
