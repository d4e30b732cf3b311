"""The needle task generator: deterministic specs, events that fit, disjoint train/eval backgrounds,
needles visible where the spec says after a real H.264 round trip, and answers that follow the spec."""

import random

import numpy as np
import pytest

from worker.engine.config import SamplingConfig
from worker.engine.decode import probe, sample_frames
from worker.needle.videos import (
    BINDING_KINDS,
    COLOURS,
    FRAME_SIZE,
    GENERIC_QUESTION,
    SHAPES,
    answer_matches,
    binding_questions,
    binding_spec,
    colour_question,
    event_map,
    questions,
    random_spec,
    render_frame,
    still_spec,
    write_video,
)


def test_specs_are_deterministic_and_splits_differ():
    assert random_spec(3, 20.0, "train") == random_spec(3, 20.0, "train")
    assert random_spec(3, 20.0, "train") != random_spec(3, 20.0, "eval")
    with pytest.raises(ValueError, match="split"):
        random_spec(3, 20.0, "test")


@pytest.mark.parametrize("seconds", [4.0, 7.9, 12.0, 20.0, 80.0])
def test_events_fit_with_margins_and_gaps(seconds):
    for seed in range(100):
        spec = random_spec(seed, seconds, "train")
        events = sorted(spec.events, key=lambda e: e.start)
        assert 1 <= len(events) <= 4
        assert len({e.shape for e in events}) == len(events)  # the needle's shape is unique
        last = events[-1]
        assert events[0].start >= 0.5 - 1e-9 and last.start + last.duration <= seconds - 0.5 + 1e-9
        pairs = zip(events, events[1:], strict=False)
        assert all(a.start + a.duration + 1.0 <= b.start + 1e-9 for a, b in pairs)
        for e in events:
            assert e.shape in SHAPES and e.colour in COLOURS and 1.0 <= e.duration <= 2.0
            assert 0.10 * FRAME_SIZE - 1 <= e.size <= 0.30 * FRAME_SIZE + 1
            assert 0 <= e.x <= FRAME_SIZE - e.size and 0 <= e.y <= FRAME_SIZE - e.size


@pytest.mark.parametrize("depth", [0.05, 0.35, 0.95])
def test_the_needle_sits_at_its_depth(depth):
    for seed in range(50):
        spec = random_spec(seed, 40.0, "eval", depth=depth, distractors=3)
        assert len(spec.events) == 4
        assert abs(spec.target.middle - depth * 40.0) <= 1.0  # clamped by the half-second margin


def test_train_and_eval_backgrounds_never_share_footage_or_texture():
    def used(split):
        specs = [random_spec(seed, 10.0, split) for seed in range(200)]
        return {(s.background.clip, s.background.first) for s in specs}, {
            s.background.texture_seed % 2 for s in specs
        }

    train_frames, train_parity = used("train")
    eval_frames, eval_parity = used("eval")
    assert all(first == 0 for _, first in train_frames) and all(first > 0 for _, first in eval_frames)
    assert train_parity == {0} and eval_parity == {1}


def test_a_needle_survives_encoding_and_our_decoder(tmp_path):
    spec = random_spec(11, 12.0, "eval", distractors=0)
    path = write_video(spec, tmp_path / "needle.mp4")
    sampling = SamplingConfig(fps=2, long_side=FRAME_SIZE)
    assert probe(path, sampling).num_samples == 24
    needle = spec.target
    inside = np.s_[needle.y + needle.size // 2, needle.x + needle.size // 2]  # the centre is always filled
    colour = np.array(COLOURS[needle.colour], dtype=float)
    for frame in sample_frames(path, sampling):
        error = np.abs(frame.image[inside].astype(float) - colour).max()
        if needle.visible(frame.timestamp):
            assert error < 40, (frame.timestamp, frame.image[inside], needle)
    # The rendered frame and the decoded one agree except for coding noise.
    decoded = next(f for f in sample_frames(path, sampling) if needle.visible(f.timestamp))
    rendered = render_frame(spec, decoded.timestamp)
    assert np.abs(decoded.image.astype(float) - rendered).mean() < 12


def test_questions_follow_the_spec():
    spec = random_spec(5, 30.0, "train", depth=0.6, distractors=2)
    qas = {qa.kind: qa for qa in questions(spec, random.Random(0))}
    needle = spec.target
    assert qas["colour"] == colour_question(spec)
    assert qas["colour"].question == f"What colour was the {needle.shape}?"
    assert qas["colour"].answer == needle.colour
    assert qas["when"].answer == "third"  # the middle at 60% of the video
    assert qas["count"].answer == "three"
    ordered = sorted(spec.events, key=lambda e: e.start)
    assert qas["describe"].question == GENERIC_QUESTION
    assert qas["describe"].answer == ", ".join(f"{e.colour} {e.shape}" for e in ordered) + "."
    a, b = qas["order"].question.removeprefix("Which came first, the ").rstrip("?").split(" or the ")
    first = min((e for e in spec.events if e.shape in (a, b)), key=lambda e: e.start)
    assert qas["order"].answer == first.shape


@pytest.mark.parametrize("seconds", [6.0, 16.0, 64.0])
def test_binding_videos_hold_two_to_four_distinct_shapes_and_colours(seconds):
    counts = set()
    for seed in range(100):
        spec = binding_spec(seed, seconds, "eval")
        assert spec == binding_spec(seed, seconds, "eval") and spec.seconds == seconds
        assert 2 <= len(spec.events) <= 4
        assert len({e.shape for e in spec.events}) == len({e.colour for e in spec.events}) == len(spec.events)
        counts.add(len(spec.events))
    assert counts == ({2} if seconds < 9 else {2, 3, 4})
    with pytest.raises(ValueError, match="two events"):
        binding_spec(0, 5.0, "train")


def test_stills_show_every_shape_apart_for_the_whole_second():
    for seed in range(50):
        spec = still_spec(seed, "train", shapes=4)
        assert spec.seconds == 1.0 and len(spec.events) == 4
        assert len({e.shape for e in spec.events}) == len({e.colour for e in spec.events}) == 4
        for t in (0.0, 0.5):
            shown = event_map(spec, t)
            for index, event in enumerate(spec.events):  # apart: no shape covers another's pixels
                mask = shown[event.y : event.y + event.size, event.x : event.x + event.size] == index
                assert mask.sum() > 0.3 * event.size**2
    assert still_spec(1, "train", 2).background != still_spec(1, "eval", 2).background


def test_binding_questions_ask_every_colour_and_every_unique_colour_s_shape():
    spec = binding_spec(4, 16.0, "train")
    qas = binding_questions(spec)
    assert {qa.question: qa.answer for qa in qas if qa.kind == "colour"} == {
        f"What colour was the {e.shape}?": e.colour for e in spec.events
    }
    assert {qa.question: qa.answer for qa in qas if qa.kind == "shape"} == {
        f"Which shape was {e.colour}?": e.shape for e in spec.events
    }
    kinds = {qa.kind for qa in questions(spec)}
    assert set(BINDING_KINDS) <= kinds  # every binding question type applies to every binding video


def test_answers_are_matched_on_their_first_words():
    assert answer_matches("Red.", "red")
    assert answer_matches("red square, blue circle.", "red square, blue circle.")
    assert not answer_matches("green", "red")
    assert not answer_matches("", "red")
