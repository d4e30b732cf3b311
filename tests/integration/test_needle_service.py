"""`videoqa serve --model models/needle/qwen2_5_vl`, with no preset set: the worker samples at the settings
the checkpoint carries and the service answers a needle video's colour question."""

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import videoqa_serve
from worker.needle.train import TrainConfig
from worker.needle.videos import answer_matches, colour_question, random_spec, write_video

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "needle" / "qwen2_5_vl"

pytestmark = pytest.mark.slow


def test_the_service_answers_a_needle_colour_with_the_checkpoint_settings(tmp_path):
    spec = random_spec(900, TrainConfig().max_seconds, "eval", distractors=0)
    video, qa = write_video(spec, tmp_path / "needle.mp4"), colour_question(spec)
    with (
        videoqa_serve(tmp_path, CHECKPOINT, preset=None) as base,
        httpx.Client(base_url=base, timeout=120) as api,
    ):
        with video.open("rb") as file:
            uploaded = api.post("/videos", files={"file": ("needle.mp4", file, "video/mp4")})
        assert uploaded.status_code == 202, uploaded.text
        index_job = uploaded.json()["links"]["index_job"]
        assert api.get(index_job, params={"wait": 60}).json()["status"] == "succeeded"
        video_record = api.get(f"/videos/{uploaded.json()['id']}").json()
        assert video_record["frames"] == round(spec.seconds * TrainConfig().fps), video_record
        asked = api.post("/ask", json={"video_id": uploaded.json()["id"], "question": qa.question,
                                       "max_new_tokens": 4})  # fmt: skip
        assert asked.status_code == 202, asked.text
        job = api.get(f"/jobs/{asked.json()['id']}", params={"wait": 60}).json()
        assert job["status"] == "succeeded", job
        assert answer_matches(job["answer"], qa.answer), (job["answer"], qa.answer)
