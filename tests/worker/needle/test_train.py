"""Training on the needle task: a run repeats exactly from its seed whatever the number of gradient
workers, the loss covers the answers only, and the result is a checkpoint that loads and answers."""

import json

import pytest

from worker.engine.checkpoint_settings import read_checkpoint_settings
from worker.engine.models import load_model
from worker.needle.train import (
    RECORD_FILE,
    TrainConfig,
    checkpoint_settings,
    conversation,
    draw_video,
    longest_at,
    save_trained,
    train,
    weights_sha256,
)
from worker.needle.videos import QA
from worker.tiny import build_tokenizer


@pytest.mark.slow
def test_first_steps_repeat_from_the_seed_with_any_number_of_workers(tmp_path):
    config = TrainConfig(videos_per_step=3)
    alone = train(config, stop_after=2, workers=1)
    forked = train(config, stop_after=2, workers=2)
    assert alone.losses == forked.losses  # bit for bit: per-video gradients summed in video order
    assert alone.losses[1] < alone.losses[0]
    first = save_trained(alone, config, tmp_path / "a", {})
    second = save_trained(forked, config, tmp_path / "b", {})
    assert weights_sha256(first) == weights_sha256(second)
    record = json.loads((first / RECORD_FILE).read_text())
    assert record["first_losses"] == alone.losses and record["weights_sha256"] == weights_sha256(first)
    assert read_checkpoint_settings(first) == checkpoint_settings(config)
    loaded = load_model(str(first), device="cpu", dtype="float32")
    assert loaded.family == config.family and loaded.revision.startswith("local-")


def test_training_supervises_the_answers_only():
    tokenizer = build_tokenizer()
    qas = [QA("colour", "What colour was the square?", "red"), QA("count", "How many shapes?", "two")]
    talk = conversation(tokenizer, qas)
    supervised = [token for token, wanted in zip(talk.rest, talk.targets, strict=True) if wanted]
    assert tokenizer.decode(supervised) == "red<|im_end|>two<|im_end|>"
    assert tokenizer.decode(talk.rest).count("<|im_start|>assistant\n") == 2


def test_the_curriculum_grows_video_length_and_asks_every_colour():
    config = TrainConfig()
    assert longest_at(config, 0) == config.start_seconds
    assert longest_at(config, config.steps) == config.max_seconds
    for step in (0, config.steps - 1):
        for item in range(config.videos_per_step):
            spec, qas = draw_video(config, step, item)
            assert config.min_seconds <= spec.seconds <= longest_at(config, step)
            colours = {qa.question: qa.answer for qa in qas if qa.kind == "colour"}
            assert colours == {f"What colour was the {e.shape}?": e.colour for e in spec.events}
    assert draw_video(config, 5, 1) == draw_video(config, 5, 1)
