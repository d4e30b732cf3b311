"""Training on the needle task: a run repeats exactly from its seed whatever the number of gradient
workers, the loss covers the answers only, and the result is a checkpoint that loads and answers."""

import json

import pytest
import torch

from worker.engine.checkpoint_settings import read_checkpoint_settings
from worker.engine.models import VisionSpec, load_model
from worker.needle.train import (
    IGNORED,
    NEEDLE_SHARE,
    RECORD_FILE,
    SHAPE_CLASSES,
    TOKEN_CLASSES,
    TrainConfig,
    binding_config,
    checkpoint_settings,
    conversation,
    draw_video,
    learning_rate,
    longest_at,
    save_trained,
    token_loss,
    token_targets,
    train,
    videos_at,
    weights_sha256,
)
from worker.needle.videos import QA, binding_questions, binding_spec, random_spec
from worker.tools.tiny import build_tokenizer


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

    # the binding stage starts from those weights, and repeats from them and its seed just the same (a vision
    # step, then a step of the whole model)
    binding = binding_config(config.family, str(first), videos_per_step=3, stills_per_step=3, vision_steps=1)
    alone = train(binding, stop_after=2, workers=1)
    assert alone.losses == train(binding, stop_after=2, workers=2).losses
    record = json.loads((save_trained(alone, binding, tmp_path / "c", {}) / RECORD_FILE).read_text())
    assert record["init"]["weights_sha256"] == weights_sha256(first)
    assert record["init"]["training"]["first_losses"] == forked.losses
    fresh = binding_config(config.family, str(save_trained(train(config, stop_after=1), config,
                                                           tmp_path / "d", {})), videos_per_step=3,
                           stills_per_step=3, vision_steps=1)  # fmt: skip
    assert train(fresh, stop_after=1).losses[0] != alone.losses[0]  # other weights, another first loss


def test_vision_steps_train_the_vision_tower_and_leave_the_language_model_as_it_was():
    init = "models/needle/qwen2_vl"
    config = binding_config("qwen2_vl", init, vision_steps=2, stills_per_step=2)
    trained = train(config, stop_after=2).loaded.model.state_dict()
    before = load_model(init, device="cpu", dtype="float32").model.state_dict()
    changed = {name for name, weights in before.items() if not torch.equal(weights, trained[name])}
    assert changed and all(".visual." in name for name in changed)
    assert learning_rate(config, config.vision_steps - 1) < config.vision_lr  # decayed over the vision steps
    assert learning_rate(config, config.vision_steps) == config.lr / config.warmup  # warm-up again


def test_the_binding_stage_needs_its_init_and_videos_that_hold_two_shapes():
    with pytest.raises(ValueError, match="init"):
        TrainConfig(stage="binding")
    with pytest.raises(ValueError, match="init"):
        TrainConfig(init="models/needle/qwen2_5_vl")
    with pytest.raises(ValueError, match="two shapes"):
        binding_config("qwen2_5_vl", "models/needle/qwen2_5_vl", min_seconds=3.0)


def test_training_supervises_the_answers_only():
    tokenizer = build_tokenizer()
    qas = [QA("colour", "What colour was the square?", "red"), QA("count", "How many shapes?", "two")]
    talk = conversation(tokenizer, qas)
    supervised = [token for token, wanted in zip(talk.rest, talk.targets, strict=True) if wanted]
    assert tokenizer.decode(supervised) == "red<|im_end|>two<|im_end|>"
    assert tokenizer.decode(talk.rest).count("<|im_start|>assistant\n") == 2


def test_the_curriculum_starts_with_stills_then_grows_video_length_and_asks_every_colour():
    config = TrainConfig()
    for step in (0, config.stills - 1):
        assert videos_at(config, step) == config.stills_per_step
        for item in range(config.stills_per_step):
            spec, qas = draw_video(config, step, item)
            (event,) = spec.events
            assert spec.seconds == 1.0 and event.visible(0.0) and event.visible(0.99)
            assert qas == [QA("colour", f"What colour was the {event.shape}?", event.colour)]
    assert longest_at(config, config.stills) == config.start_seconds
    assert longest_at(config, config.steps) == config.max_seconds
    for step in (config.stills, config.steps - 1):
        assert videos_at(config, step) == config.videos_per_step
        for item in range(config.videos_per_step):
            spec, qas = draw_video(config, step, item)
            assert config.min_seconds <= spec.seconds <= longest_at(config, step)
            colours = {qa.question: qa.answer for qa in qas if qa.kind == "colour"}
            assert colours == {f"What colour was the {e.shape}?": e.colour for e in spec.events}
    assert draw_video(config, 5, 1) == draw_video(config, 5, 1)


def test_the_binding_curriculum_asks_every_colour_and_every_shape_of_stills_then_videos():
    config = binding_config("qwen2_vl", "unused")
    shapes_seen = set()
    for item in range(config.stills_per_step):
        spec, qas = draw_video(config, 0, item)
        assert spec.seconds == 1.0 and all(e.visible(0.0) and e.visible(0.99) for e in spec.events)
        assert sorted(qas, key=repr) == sorted(binding_questions(spec), key=repr)  # colour and shape of each
        assert {qa.kind for qa in qas} == {"colour", "shape"}
        shapes_seen.add(len(spec.events))
    assert shapes_seen == {1, 2, 3, 4}
    assert draw_video(config, config.vision_steps + 5, 0)[0].seconds == 1.0  # stills after the vision steps
    distinct, drawn = 0, 0
    for step in (config.first_video, config.steps - 1):
        for item in range(config.videos_per_step):
            spec, qas = draw_video(config, step, item)
            assert config.min_seconds <= spec.seconds <= longest_at(config, step)
            asked = {qa.question: qa.answer for qa in qas}
            assert all(asked[qa.question] == qa.answer for qa in binding_questions(spec))
            assert len([qa for qa in qas if qa.kind not in ("colour", "shape")]) == 1
            colours = [e.colour for e in spec.events]
            distinct += len(spec.events) >= 2 and len(set(colours)) == len(colours)
            drawn += 1
    assert distinct >= (1 - NEEDLE_SHARE) * drawn / 2  # mostly binding videos, some plain needle ones
    assert draw_video(config, 900, 3) == draw_video(config, 900, 3)
    assert draw_video(config, 900, 3) != draw_video(TrainConfig(), 900, 3)  # its own draws


def test_token_targets_mark_the_tokens_that_hold_a_shape():
    vision = VisionSpec(patch_size=14, temporal_patch_size=2, merge_size=2)
    spec = random_spec(3, 8.0, "train", distractors=1)
    labels = token_targets(spec, 16, vision, fps=2.0).view(8, 4, 4)  # [time, rows, columns]
    for event in spec.events:
        colour = TOKEN_CLASSES.index(event.colour)
        groups = {int(t) for t in (labels == colour).nonzero()[:, 0]}
        # the tokens of the two frames (0.5 s apart) in which the shape is on screen, and no others
        assert groups and all(event.visible(2 * g / 2.0) or event.visible((2 * g + 1) / 2.0) for g in groups)
        # the token holding the shape's centre
        t = next(iter(groups))
        cx, cy = event.x + event.size // 2, event.y + event.size // 2
        assert labels[t].flatten().tolist().count(colour) >= 1
        assert labels[t, cy // 28, cx // 28] in (colour, IGNORED)
    assert (labels == 0).sum() > 0.8 * labels.numel()  # mostly background
    # the kind of each shape on the same tokens (a binding video: colours distinct, so each names a shape)
    spec = binding_spec(3, 8.0, "train")
    colours = token_targets(spec, 16, vision, fps=2.0)
    kinds = token_targets(spec, 16, vision, fps=2.0, attribute="shape")
    for event in spec.events:
        colour, shape = TOKEN_CLASSES.index(event.colour), SHAPE_CLASSES.index(event.shape)
        assert (colours == colour).any() and ((colours == colour) == (kinds == shape)).all()
    assert ((colours == 0) == (kinds == 0)).all() and ((colours == IGNORED) == (kinds == IGNORED)).all()


def test_token_loss_weighs_needles_and_background_alike():
    logits = torch.zeros(100, len(TOKEN_CLASSES))
    logits[:, 0] = 5.0  # says background everywhere
    labels = torch.zeros(100, dtype=torch.long)
    labels[:2] = 3
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert token_loss(logits, labels) > 5 > plain  # the two needle tokens count as much as the 98 others
