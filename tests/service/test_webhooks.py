"""Signed webhooks with real HTTP receivers on 127.0.0.1 (127.0.0.2 plays a refused host): the signature,
retries with one event id, a receiver that comes back, and restarts of the API that lose nothing. A test
plays the worker's part by writing the records as a worker does."""

import json
import time

import pytest

from service.contract import JobStatus, VideoStatus
from service.webhooks import MAX_ATTEMPTS, SIGNATURE_HEADER, retry_delay, signature, verify
from tests.conftest import free_port
from tests.service.conftest import ALICE, ALICE_KEY
from tests.service.helpers import LoopbackServer, fake_mp4, reply, wait_for

SECRET = "whsec-0123456789abcdef"


@pytest.fixture
def app(make_client):
    """make_app() -> a started API with webhooks on, delivering to 127.0.0.1, retrying fast."""

    def make_app():
        return make_client(api_keys=f"{ALICE_KEY}:alice", webhook_secret=SECRET,
                           url_allowed_networks="127.0.0.1/32", webhook_first_retry_seconds=0.3)  # fmt: skip

    return make_app


def receiver(statuses: list[int]) -> LoopbackServer:
    """A receiver answering each POST with the next of `statuses` (the last one again after them)."""
    answers = iter(statuses)
    last = [statuses[-1]]

    def handle(handler):
        last[0] = next(answers, last[0])
        reply(handler, last[0], b"ok")

    return LoopbackServer(handle)


def upload(client, seed: int, callback_url: str | None = None) -> dict:
    data = {"callback_url": callback_url} if callback_url else {}
    response = client.post("/videos", files={"file": ("v.mp4", fake_mp4(seed), "video/mp4")}, data=data,
                           headers=ALICE)  # fmt: skip
    assert response.status_code == 202, response.text
    return response.json()


def deliveries(server: LoopbackServer) -> list[tuple[dict, dict, bytes]]:
    return [
        (json.loads(body), headers, body) for method, _, headers, body in server.requests if method == "POST"
    ]


def test_signatures_verify_and_nothing_else_does():
    body, now = b'{"id": "evt_1"}', int(time.time())
    header = signature(SECRET, body, now)
    assert header.startswith(f"t={now},v1=") and verify(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)  # another body
    assert not verify("another-secret", body, header)
    assert not verify(SECRET, body, signature(SECRET, body, now - 3600))  # replayed an hour later
    assert not verify(SECRET, body, "v1=abc") and not verify(SECRET, body, "")


def test_retries_start_within_10_s_and_span_at_least_12_hours():
    delays = [retry_delay(attempt, 5.0) for attempt in range(1, MAX_ATTEMPTS)]
    assert MAX_ATTEMPTS - 1 >= 8 and delays[0] <= 10 and sum(delays) >= 12 * 3600
    assert delays == sorted(delays)


def test_video_ready_is_posted_signed_with_the_resource_as_get_returns_it(app, records):
    client = app()
    with receiver([200]) as server:
        video = upload(client, 1, server.url("/hook"))
        assert video["callback_url"] == server.url("/hook")
        records.update_video(video["id"], status=VideoStatus.READY, stage="ready", progress=1.0)
        wait_for(lambda: deliveries(server))
        [(event, headers, body)] = deliveries(server)
        assert verify(SECRET, body, headers[SIGNATURE_HEADER])
        assert event["id"].startswith("evt_") and event["type"] == "video.ready"
        assert event["data"]["id"] == video["id"] and event["data"]["status"] == "ready"
        assert set(event) == {"id", "type", "created_at", "data"}
        shown = wait_for(lambda: client.get(f"/videos/{video['id']}", headers=ALICE).json()["webhook"])
        assert (shown["event_id"], shown["attempts"], shown["delivered"], shown["last_result"]) == (
            event["id"],
            1,
            True,
            "200",
        )


def test_a_500_then_a_200_is_two_deliveries_of_one_event(app, records):
    client = app()
    video = upload(client, 2)
    with receiver([500, 200]) as server:
        body = {"video_id": video["id"], "question": "Hi?", "callback_url": server.url("/jobs")}
        ask = client.post("/ask", json=body, headers=ALICE).json()
        records.update_job(ask["id"], status=JobStatus.SUCCEEDED, answer="A bunny.", token_count=2)
        wait_for(lambda: len(deliveries(server)) == 2)
        time.sleep(1.0)  # no third one
        events = [event for event, _, _ in deliveries(server)]
        assert len(events) == 2 and events[0] == events[1] and events[0]["type"] == "job.succeeded"
        assert events[0]["data"]["answer"] == "A bunny."
        shown = client.get(f"/jobs/{ask['id']}", headers=ALICE).json()["webhook"]
        assert (shown["attempts"], shown["delivered"], shown["next_attempt_at"]) == (2, True, None)


def test_a_receiver_that_is_down_for_a_while_gets_the_event_when_it_comes_back(app, records):
    client = app()
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    video = upload(client, 3, url)
    records.update_video(
        video["id"], status=VideoStatus.FAILED, error_code="corrupt_video", error_message="x"
    )
    shown = wait_for(lambda: client.get(f"/videos/{video['id']}", headers=ALICE).json()["webhook"] or {})
    assert shown["delivered"] is False and shown["last_result"] == "ConnectError" and shown["next_attempt_at"]
    with LoopbackServer(lambda handler: reply(handler, 204), port=port) as server:
        wait_for(lambda: deliveries(server), timeout=15)
        [(event, headers, body)] = deliveries(server)
    assert event["type"] == "video.failed" and event["data"]["error"]["code"] == "corrupt_video"
    assert event["id"] == shown["event_id"] and verify(SECRET, body, headers[SIGNATURE_HEADER])


def test_events_wait_in_redis_across_restarts_of_the_api(make_client, app, records):
    first = app()
    with receiver([503, 503, 200]) as server:
        video = upload(first, 4, server.url("/hook"))
        first.__exit__(None, None, None)  # the API stops: nothing delivers
        records.update_video(video["id"], status=VideoStatus.READY)  # a worker finishes meanwhile
        time.sleep(0.8)
        assert deliveries(server) == []
        second = app()  # the API comes back: the event was waiting
        wait_for(lambda: deliveries(server))
        second.__exit__(None, None, None)  # and stops again between the retries
        attempts = len(deliveries(server))
        time.sleep(0.8)
        assert len(deliveries(server)) == attempts
        app()
        wait_for(lambda: len(deliveries(server)) == 3, timeout=15)
        ids = {event["id"] for event, _, _ in deliveries(server)}
    assert len(ids) == 1  # one event, the same id on every attempt, whichever process sent it


def test_a_callback_url_the_guard_refuses_is_a_400_at_submission(app, make_client, records):
    client = app()
    with LoopbackServer(lambda handler: reply(handler, 200), host="127.0.0.2") as refused:
        response = client.post("/videos", files={"file": ("v.mp4", fake_mp4(5), "video/mp4")},
                               data={"callback_url": refused.url("/hook")}, headers=ALICE)  # fmt: skip
        assert (response.status_code, response.json()["error"]["code"]) == (400, "url_forbidden")
        video = upload(client, 6)
        body = {"video_id": video["id"], "question": "Hi?", "callback_url": "http://169.254.169.254/latest"}
        ask = client.post("/ask", json=body, headers=ALICE)
        assert (ask.status_code, ask.json()["error"]["code"]) == (400, "url_forbidden")
        by_url = client.post("/videos", json={"url": "http://127.0.0.1:9/v.mp4", "callback_url": "ftp://x"},
                             headers=ALICE)  # fmt: skip
        assert (by_url.status_code, by_url.json()["error"]["code"]) == (400, "url_forbidden")
        assert refused.connections == 0
    without_secret = make_client(api_keys=f"{ALICE_KEY}:alice")
    body = {"video_id": video["id"], "question": "Hi?", "callback_url": "http://127.0.0.1:9/"}
    off = without_secret.post("/ask", json=body, headers=ALICE)
    assert (off.status_code, off.json()["error"]["code"]) == (400, "webhooks_disabled")
