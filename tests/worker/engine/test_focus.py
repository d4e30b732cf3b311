"""Focused answers on tiny random models of both architectures: what is re-read, what it costs, what stays."""

import pytest
import torch

from tests.helpers import make_video
from worker.engine.adaretake import CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.decode import sample_frames
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.focus import FocusConfig, answer_focused, distinct_moments, focus_windows
from worker.engine.models import load_model
from worker.engine.prompt import build_prompt

SAMPLING = SamplingConfig(fps=2, max_frames=64, long_side=112)
QUESTION = "What is moving?"
SECONDS, FPS, GOP = 20.0, 10, 10  # a keyframe every second


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("focus") / "keyframes.mp4"
    make_video(path, seconds=SECONDS, fps=FPS, gop=GOP)
    return path


def compressed(loaded, video):
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    return compress_video(
        loaded, video, CompressionConfig(sampling=SAMPLING, budget=text0 + 16, chunk_frames=4)
    )


def ask(loaded):
    return lambda artifact, tokens: answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=tokens)


def test_windows_merge_and_hold_an_even_number_of_frames():
    config = FocusConfig(window=2.0, fps=2.0)
    windows = focus_windows([5.0, 5.5, 12.0], duration=20.0, config=config)
    assert [(w.start, w.end) for w in windows] == [(4.0, 6.5), (11.0, 13.0)]
    assert [len(w.times) for w in windows] == [6, 4]
    end = focus_windows([19.9], duration=20.0, config=config)[0]
    assert end.end == 20.0 and max(end.times) <= 20.0 and len(end.times) % 2 == 0


def test_moments_to_reread_are_a_window_apart():
    timeline = [(0.0, 0.1), (0.5, 0.3), (1.0, 0.3), (1.5, 0.05), (6.0, 0.2), (6.5, 0.05)]
    assert distinct_moments(timeline, 2, spacing=2.0) == [(0.5, 0.3), (6.0, 0.2)]
    assert distinct_moments(timeline, 3, spacing=2.0) == [(0.5, 0.3), (6.0, 0.2)]  # no third one that far


def test_sampling_chosen_times_decodes_only_around_them(video):
    """From a keyframe each second, frames 12.0-13.5 s cost at most the second before them and themselves,
    not the 12 seconds before."""
    frames = sample_frames(video, SAMPLING, times=[12.0, 12.5, 13.0, 13.5])
    got = list(frames)
    assert [f.timestamp for f in got] == pytest.approx([12.0, 12.5, 13.0, 13.5])
    assert frames.strategy == "seek"
    assert frames.decoded_frames <= 1 + (1 + 1.5) * FPS + 1  # the first frame, a keyframe gap, the window


def test_a_focused_answer_rereads_only_its_windows_and_leaves_the_artifact(loaded, video):
    artifact = compressed(loaded, video)
    before = [t.clone() for t in (*artifact.keys, *artifact.values, *artifact.token_frames)]
    config = FocusConfig(moments=2, window=2.0, fps=2.0)
    answer = answer_focused(loaded, artifact, video, ask(loaded), config=config, sampling=SAMPLING,
                            max_new_tokens=3)  # fmt: skip
    focus = answer.focus
    windows = focus_windows([t for t, _ in focus["moments"]], SECONDS, config)
    assert focus["windows"] == [[w.start, w.end] for w in windows]
    assert focus["frames"] == sum(len(w.times) for w in windows)
    # Each window costs at most a keyframe gap before it and itself (plus the stream's first frame).
    longest = sum((w.end - w.start) + 1.0 for w in windows) * FPS + len(windows) + 1
    assert focus["decoded_frames"] <= longest < SECONDS * FPS / 2
    assert focus["frame_size"] == [112, 56]
    after = [*artifact.keys, *artifact.values, *artifact.token_frames]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [t for t, _ in answer.timeline] == artifact.timestamps
    assert sum(share for _, share in answer.timeline) == pytest.approx(1.0)
    assert len(answer.token_ids) == 3
    assert {"focus_prefill", "focus_decode", "focus_vision", "focus_video_prefill"} <= answer.timings.keys()


def test_the_windows_change_the_answer_logits(loaded, video):
    """The re-read frames are seen: the second pass's first logits differ from a cached answer's."""
    artifact = compressed(loaded, video)
    steps = {"cached": [], "focused": []}
    answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=1, on_step=steps["cached"].append)

    def ask_recording(artifact_, tokens):
        return answer_from_artifact(loaded, artifact_, QUESTION, max_new_tokens=tokens,
                                    on_step=steps["focused"].append if tokens else None)  # fmt: skip

    answer_focused(loaded, artifact, video, ask_recording, sampling=SAMPLING, max_new_tokens=1)
    assert not torch.allclose(steps["cached"][0], steps["focused"][0])


def test_a_focused_answer_without_its_video_says_so(loaded, video, tmp_path):
    artifact = compressed(loaded, video)
    with pytest.raises(FileNotFoundError, match="re-reads the video"):
        answer_focused(loaded, artifact, tmp_path / "gone.mp4", ask(loaded), sampling=SAMPLING)
