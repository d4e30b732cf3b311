"""/v1 through the real `openai` SDK against the app (TestClient as its HTTP client), a thread playing the
worker's part on the records: models, files, chat completions whole and streamed, OpenAI-shaped errors."""

import base64
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest

from service.contract import JobStatus, VideoStatus
from service.records import Records
from tests.service.conftest import ALICE_KEY, BOB_KEY
from tests.service.helpers import fake_mp4, wait_for, wav_header

MODEL = "tiny-vl"


@pytest.fixture
def app_client(make_client):
    return make_client(api_keys=f"{ALICE_KEY}:alice,{BOB_KEY}:bob", served_model_name=MODEL,
                       max_upload_bytes=64 * 1024, chat_wait_seconds=20)  # fmt: skip


def sdk(app_client, key: str = ALICE_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=app_client, max_retries=0)


@pytest.fixture
def client(app_client) -> openai.OpenAI:
    return sdk(app_client)


@contextmanager
def answering_worker(records: Records, words=("It ", "is ", "a ", "bunny.")) -> Iterator[list[dict]]:
    """A thread that answers every queued answer job as a worker does (status, token events, the record,
    done), its video ready, 100 cached tokens; yields the jobs it answered, as they were queued."""
    answered: list[dict] = []
    stopping = threading.Event()

    def run():
        while not stopping.wait(0.02):
            for job_id in records.active_jobs():
                job = records.get_job(job_id)
                if job is None or job["kind"] != "answer" or job["status"] != JobStatus.QUEUED:
                    continue
                answered.append(job)
                records.update_video(job["video_id"], status=VideoStatus.READY)
                records.update_job(job_id, status=JobStatus.RUNNING)
                records.append_event(job_id, "status", {"status": "running"})
                for word in words:
                    records.append_event(job_id, "token", {"text": word})
                records.update_job(
                    job_id, status=JobStatus.SUCCEEDED, answer="".join(words), token_count=len(words),
                    prompt_tokens=130, cached_tokens=100, cache_hit=True, cache_tier="memory",
                    cache_reason="hit:memory", timeline=[[0.0, 0.7], [0.5, 0.3]], top_moments=[[0.0, 0.7]],
                )  # fmt: skip
                records.append_event(job_id, "done", {"status": "succeeded"})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        stopping.set()
        thread.join()


def upload(client: openai.OpenAI, content: bytes, name: str = "clip.mp4", purpose: str = "vision"):
    return client.files.create(file=(name, content, "video/mp4"), purpose=purpose)


def video_part(file_id: str) -> dict:
    return {"type": "file", "file": {"file_id": file_id}}


def ask(client: openai.OpenAI, content, **extra):
    extra.setdefault("max_tokens", 8)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **extra
    )


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "videoqa"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_files_create_retrieve_list_content_and_delete(client, records):
    created = upload(client, fake_mp4(1), "one.mp4")
    assert created.object == "file" and created.purpose == "vision" and created.status == "uploaded"
    assert created.bytes == 2048 and created.filename == "one.mp4"
    again = upload(client, fake_mp4(1), "copy.mp4", purpose="user_data")
    assert again.id == created.id  # the same bytes: the same video, deduplicated
    second = upload(client, fake_mp4(2), "two.mp4", purpose="user_data")

    records.update_video(created.id, status=VideoStatus.READY)
    assert client.files.retrieve(created.id).status == "processed"
    records.update_video(
        second.id, status=VideoStatus.FAILED, error_code="corrupt_video", error_message="bad"
    )
    failed = client.files.retrieve(second.id)
    assert (failed.status, failed.status_details) == ("error", "corrupt_video: bad")

    page = client.files.list(limit=1)
    assert [file.id for file in page.data] == [second.id] and page.has_more
    assert [file.id for file in client.files.list(limit=1)] == [second.id, created.id]  # auto-paged
    assert client.files.content(created.id).read() == fake_mp4(1)

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    assert records.get_video(created.id) is None
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_files_errors_are_the_sdks_exception_classes(client, app_client):
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        upload(client, fake_mp4(3), purpose="fine-tune")
    assert bad_purpose.value.code == "invalid_purpose" and bad_purpose.value.param == "purpose"
    with pytest.raises(openai.APIStatusError) as too_large:
        upload(client, fake_mp4(4, size=65 * 1024))
    assert too_large.value.status_code == 413 and too_large.value.code == "payload_too_large"
    with pytest.raises(openai.APIStatusError) as not_video:
        upload(client, wav_header(), "a.wav")
    assert not_video.value.status_code == 415 and not_video.value.code == "unsupported_media_type"
    with pytest.raises(openai.AuthenticationError):
        upload(sdk(app_client, "not-a-key-0123456789"), fake_mp4(5))
    bob = sdk(app_client, BOB_KEY)
    alices = upload(client, fake_mp4(6))
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(alices.id)  # another tenant's file does not exist for bob
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(alices.id)


def test_errors_take_openais_shape(app_client):
    response = app_client.get("/v1/files/vid_nope", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert response.status_code == 404
    error = {"message": "file not found", "type": "not_found_error", "param": None, "code": "not_found"}
    assert response.json() == {"error": error}
    unknown_route = app_client.get("/v1/nothing-here", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert set(unknown_route.json()["error"]) == {"message", "type", "param", "code"}
    ours = app_client.get("/videos/vid_nope", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert ours.json() == {"error": {"code": "not_found", "message": "video not found"}}  # ours elsewhere


def test_chat_with_a_file_part_answers_with_usage_and_evidence(client, records):
    file = upload(client, fake_mp4(7))
    with answering_worker(records) as answered:
        reply = ask(client, [{"type": "text", "text": "What is it?"}, video_part(file.id)])
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.content == "It is a bunny."
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        130,
        4,
        134,
    )
    assert reply.usage.prompt_tokens_details.cached_tokens == 100
    facts = reply.model_extra["videoqa"]
    assert facts["video_id"] == file.id and facts["cache"]["hit"] is True
    assert facts["evidence"]["top_moments"] == [[0.0, 0.7]]
    [job] = answered
    assert (job["question"], job["max_new_tokens"], job["history"]) == ("What is it?", 8, [])


def test_streaming_sends_chunks_finish_usage_and_done(client, records):
    file = upload(client, fake_mp4(8))
    with answering_worker(records):
        chunks = list(ask(client, [video_part(file.id), {"type": "text", "text": "Who?"}], stream=True,
                          stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "It is a bunny."
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == 100
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}


def test_earlier_messages_become_the_history_and_the_uuid_form_names_a_file(client, records):
    file = upload(client, fake_mp4(9))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "video_url", "video_url": None, "uuid": file.id},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A bunny."},
        {"role": "user", "content": "What colour?"},
    ]  # fmt: skip
    with answering_worker(records) as answered:
        client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4)
    [job] = answered
    assert (job["video_id"], job["question"]) == (file.id, "What colour?")
    assert job["history"] == [["What is it?", "A bunny."]] and job["max_new_tokens"] == 4


def test_a_data_url_is_ingested_as_an_upload_of_its_bytes(client, records):
    content = fake_mp4(10)
    url = "data:video/mp4;base64," + base64.b64encode(content).decode()
    with answering_worker(records) as answered:
        reply = ask(
            client, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi?"}]
        )
    assert reply.choices[0].message.content == "It is a bunny."
    [job] = answered
    assert upload(client, content).id == job["video_id"]  # deduplicated by content, like an upload
    assert client.files.content(job["video_id"]).read() == content


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"role": "user", "content": "No video?"}], "video_required"),
        ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "A"}},
                                       {"type": "file", "file": {"file_id": "B"}}, ]}], "too_many_videos"),
        ([{"role": "assistant", "content": "Hello"}, {"role": "user", "content": [
            {"type": "file", "file": {"file_id": "A"}}, {"type": "text", "text": "Hi"}]}],
         "invalid_messages"),
        ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "A"}}]}], "question_empty"),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4,xyz"}},
                                       {"type": "text", "text": "Hi"}]}], "invalid_data_url"),
        ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "validation_error"),
        ([], "validation_error"),
    ],
)  # fmt: skip
def test_malformed_messages_are_400_with_a_code(client, messages, code):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=messages)
    assert error.value.code == code, error.value.body


def test_a_second_video_in_a_later_message_is_refused(client):
    first, second = upload(client, fake_mp4(11)), upload(client, fake_mp4(12))
    messages = [
        {"role": "user", "content": [video_part(first.id), {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A bunny."},
        {"role": "user", "content": [video_part(second.id), {"type": "text", "text": "And this one?"}]},
    ]
    with pytest.raises(openai.BadRequestError, match="one video"):
        client.chat.completions.create(model=MODEL, messages=messages)


def test_chat_errors_unknown_file_model_key_and_a_video_not_a_video(client, app_client, records):
    with pytest.raises(openai.NotFoundError):
        ask(client, [video_part("vid_unknown"), {"type": "text", "text": "Hi?"}])
    file = upload(client, fake_mp4(13))
    with pytest.raises(openai.NotFoundError) as wrong_model:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
            video_part(file.id), {"type": "text", "text": "Hi?"}]}])  # fmt: skip
    assert wrong_model.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        ask(sdk(app_client, "not-a-key-0123456789"), [video_part(file.id), {"type": "text", "text": "Hi?"}])
    url = "data:video/mp4;base64," + base64.b64encode(wav_header()).decode()
    with pytest.raises(openai.APIStatusError) as not_video:
        ask(client, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi?"}])
    assert not_video.value.status_code == 415
    with pytest.raises(openai.BadRequestError):
        ask(client, [video_part(file.id), {"type": "text", "text": "Hi?"}], max_tokens=10**6)
    assert records.active_jobs() == [records.get_video(file.id)["index_job_id"]]  # no answer job was made


def test_a_failed_answer_is_an_error_and_a_slow_one_a_timeout(client, make_client, records):
    file = upload(client, fake_mp4(14))

    def fail_answers():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for job_id in records.active_jobs():
                job = records.get_job(job_id)
                if job and job["kind"] == "answer":
                    records.update_job(job_id, status=JobStatus.FAILED, error_code="answer_too_large",
                                       error_message="too large")  # fmt: skip
                    records.append_event(job_id, "done", {"status": "failed"})
                    return
            time.sleep(0.02)

    failing = threading.Thread(target=fail_answers)
    failing.start()
    with pytest.raises(openai.BadRequestError) as failed:
        ask(client, [video_part(file.id), {"type": "text", "text": "Hi?"}])
    failing.join()
    assert failed.value.code == "answer_too_large"

    impatient = make_client(api_keys=f"{ALICE_KEY}:alice", served_model_name=MODEL, chat_wait_seconds=0.5)
    with pytest.raises(openai.APIStatusError) as slow:
        ask(sdk(impatient), [video_part(file.id), {"type": "text", "text": "Hi?"}])
    assert slow.value.status_code == 504 and slow.value.code == "answer_timeout"


def test_sampling_parameters_go_to_the_answer_job(client, records):
    file = upload(client, fake_mp4(15))
    content = [video_part(file.id), {"type": "text", "text": "Hi?"}]
    with answering_worker(records) as answered:
        ask(client, content, temperature=0.7, top_p=0.9, seed=5, stop=["\n", "END"])
        ask(client, content, stop="END")
        ask(client, content)
    sampled, one_stop, default = answered
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"], sampled["stop"]) == (
        0.7,
        0.9,
        5,
        ["\n", "END"],
    )
    assert one_stop["stop"] == ["END"]
    assert (default["temperature"], default["top_p"], default["seed"], default["stop"]) == (
        None,
        None,
        None,
        [],
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
     ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop")],
)  # fmt: skip
def test_sampling_parameters_out_of_range_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [video_part("vid_x"), {"type": "text", "text": "Hi?"}], **extra)
    assert error.value.param.startswith(param), error.value.body


def test_a_video_that_failed_or_is_still_downloading_cannot_be_asked_about(client, records):
    failed = upload(client, fake_mp4(16))
    records.update_video(
        failed.id, status=VideoStatus.FAILED, error_code="corrupt_video", error_message="bad"
    )
    with pytest.raises(openai.ConflictError) as conflict:
        ask(client, [video_part(failed.id), {"type": "text", "text": "Hi?"}])
    assert conflict.value.code == "video_failed" and "corrupt_video" in conflict.value.message
    downloading = records.create_download(tenant="alice", url="http://x/v.mp4", filename="v.mp4",
                                          deadline=time.time() + 60)  # fmt: skip
    with pytest.raises(openai.ConflictError) as waiting:
        ask(client, [video_part(downloading["id"]), {"type": "text", "text": "Hi?"}])
    assert waiting.value.code == "video_downloading"
    assert [job for job in records.active_jobs() if records.get_job(job)["kind"] == "answer"] == []


def test_a_streamed_chat_sends_keep_alives_while_the_video_is_indexed(app_client, records, monkeypatch):
    from service.routers import jobs

    monkeypatch.setattr(jobs, "SSE_KEEPALIVE_S", 0.1)
    file = upload(sdk(app_client), fake_mp4(17))
    content = [video_part(file.id), {"type": "text", "text": "Hi?"}]
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": content}],
    }
    lines: list[str] = []

    def stream():
        headers = {"Authorization": f"Bearer {ALICE_KEY}"}
        with app_client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            for line in response.iter_lines():
                lines.append(line)

    streaming = threading.Thread(target=stream)
    streaming.start()
    wait_for(lambda: lines.count(": keep-alive") >= 2)
    with answering_worker(records):  # the worker comes only now
        streaming.join(10)
    assert lines.count(": keep-alive") >= 2 and lines[-2:] == ["data: [DONE]", ""]
    assert any('"content":"It "' in line for line in lines)
