"""Conversations: POST /ask starts or continues one; read them by id or per video."""

import pytest
import redis

from service.contract import JobStatus
from tests.service.conftest import ALICE, BOB
from tests.service.helpers import fake_mp4


def upload(client, seed: int, headers=None) -> dict:
    return client.post(
        "/videos", files={"file": ("a.mp4", fake_mp4(seed), "video/mp4")}, headers=headers
    ).json()


def ask(client, video_id: str, question: str, headers=None, **extra):
    return client.post("/ask", json={"video_id": video_id, "question": question, **extra}, headers=headers)


@pytest.fixture
def video(client) -> dict:
    return upload(client, 1)


def test_a_question_starts_a_conversation_and_a_follow_up_continues_it(client, records, video):
    first = ask(client, video["id"], "Who is there?").json()
    assert first["conversation_id"].startswith("conv_")
    records.update_job(first["id"], status=JobStatus.SUCCEEDED, answer="A rabbit.")
    second = ask(
        client, video["id"], "What does he do next?", conversation_id=first["conversation_id"]
    ).json()
    assert second["conversation_id"] == first["conversation_id"]
    other = ask(client, video["id"], "Unrelated").json()
    assert other["conversation_id"] != first["conversation_id"]

    conversation = client.get(f"/conversations/{first['conversation_id']}").json()
    assert conversation["video_id"] == video["id"]
    assert [turn["question"] for turn in conversation["turns"]] == ["Who is there?", "What does he do next?"]
    assert conversation["turns"][0]["answer"] == "A rabbit."
    listed = client.get(f"/videos/{video['id']}/conversations").json()["items"]
    assert [c["id"] for c in listed] == [other["conversation_id"], first["conversation_id"]]  # newest first

    # What the worker puts into the follow-up's prompt: the answered exchanges before it, in order.
    history = client.app.state.conversations.history(first["conversation_id"], before_job_id=second["id"])
    assert history == [("Who is there?", "A rabbit.")]


def test_conversations_are_the_tenants_own_and_about_one_video(tenants_client):
    alice_video, other_video = upload(tenants_client, 2, ALICE), upload(tenants_client, 3, ALICE)
    first = ask(tenants_client, alice_video["id"], "Who?", ALICE).json()
    conversation_id = first["conversation_id"]
    assert tenants_client.get(f"/conversations/{conversation_id}", headers=BOB).status_code == 404
    assert tenants_client.get(f"/videos/{alice_video['id']}/conversations", headers=BOB).status_code == 404
    bob_video = upload(tenants_client, 2, BOB)
    refused = ask(tenants_client, bob_video["id"], "And?", BOB, conversation_id=conversation_id)
    assert refused.status_code == 404 and refused.json()["error"]["message"] == "conversation not found"
    mismatch = ask(tenants_client, other_video["id"], "And?", ALICE, conversation_id=conversation_id)
    assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "conversation_mismatch"
    assert ask(tenants_client, alice_video["id"], "?", ALICE, conversation_id="conv_nope").status_code == 404


def test_conversations_are_deleted_with_their_video(client, settings, video):
    conversation_id = ask(client, video["id"], "Who?").json()["conversation_id"]
    assert client.delete(f"/videos/{video['id']}").status_code == 204
    assert client.get(f"/conversations/{conversation_id}").status_code == 404
    store = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        assert not [key for key in store.scan_iter(count=1000) if "conv" in key]
    finally:
        store.close()
