"""Focused answers: look closer at the moments the question points to, then answer again.

A compressed cache keeps a few tokens of most frames: enough to find the moment, not always enough to see
it well. A focused answer

1. prefills the question after the compressed cache (no token is decoded): its evidence
   (`worker.engine.evidence`) gives the top `FocusConfig.moments` moments, each at least a window from the
   others (a temporal grid's two frames share one share: the second best frame is otherwise the best's
   neighbour);
2. re-reads the source video in a window around each (overlapping windows merged), at `FocusConfig.fps`
   and `FocusConfig.long_side`: only those frames are decoded (`sample_frames(times=...)`);
3. encodes them and prefills them after the cached video, each as a clip of its own with its times stated
   before it, `<|vision_end|>From 00:12.0 to 00:14.0:<|vision_start|>[clip]`, at positions that continue
   after the video (a second video in the same prompt, as Qwen's chat format places one);
4. answers the question from that, its evidence the mean of both passes' timelines (a re-read frame counts
   for the sampled frame nearest to it).

The stored artifact is never modified: the windows go into a copy of its cache (`CompressedKV` returned
by `focus_steps`, not stored). What it costs beyond a cached answer: decoding, vision and prefill of the
windows' frames, and the question's prefill once more.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.artifact import CompressedKV
from worker.engine.config import SamplingConfig
from worker.engine.decode import SampledFrame, sample_frames
from worker.engine.engine import CachedAnswer, cache_from_artifact, use_adaretake_attention
from worker.engine.evidence import top_moments
from worker.engine.generate import embed_tokens, forward, multimodal_position_ids
from worker.engine.models import LoadedModel
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.prompt import VISION_END, VISION_START
from worker.engine.steps import StepFactory, Steps, run_here
from worker.engine.timing import StageTimer


@dataclass(frozen=True)
class FocusConfig:
    """How a focused answer re-reads the video.

    Args:
        moments (int): top evidence moments re-read.
        window (float): seconds re-read around each moment (centred on it).
        fps (float): frames per second decoded in a window.
        long_side (int): the longest side of a re-read frame in pixels (never upscaled); 0: the
            compression's.
    """

    moments: int = 2
    window: float = 2.0
    fps: float = 2.0
    long_side: int = 0

    def __post_init__(self):
        if self.moments < 1:
            raise ValueError(f"focus moments must be at least 1, got {self.moments}")
        if not self.window > 0 or not self.fps > 0:
            raise ValueError(f"focus window and fps must be positive, got {self.window}, {self.fps}")
        if self.long_side < 0:
            raise ValueError(f"focus long_side must be 0 (the compression's) or more, got {self.long_side}")

    def sampling(self, compression: SamplingConfig) -> SamplingConfig:
        long_side = self.long_side or compression.long_side
        return dataclasses.replace(compression, fps=self.fps, long_side=long_side)


@dataclass(frozen=True)
class Window:
    """A stretch of the video re-read: `times` are its frames' target seconds (an even count)."""

    start: float
    end: float
    times: tuple[float, ...]


def distinct_moments(
    timeline: list[tuple[float, float]], count: int, spacing: float
) -> list[tuple[float, float]]:
    """The `count` highest-share (timestamp, share) of `timeline`, best first, each at least `spacing`
    seconds from those before it."""
    chosen: list[tuple[float, float]] = []
    for t, share in top_moments(timeline, len(timeline)):
        if len(chosen) == count:
            break
        if all(abs(t - other) >= spacing for other, _ in chosen):
            chosen.append((t, share))
    return chosen


def focus_windows(moments: Sequence[float], duration: float, config: FocusConfig) -> list[Window]:
    """A window of `config.window` seconds around each moment, clipped to the video, overlapping ones
    merged, in time order; each gets an even number of frames at `config.fps` (two make a temporal grid)."""
    spans = sorted((max(0.0, t - config.window / 2), min(duration, t + config.window / 2)) for t in moments)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    windows = []
    last = max(0.0, duration - 0.5 / config.fps)  # the latest target a frame surely answers
    for start, end in merged:
        count = max(2, 2 * math.ceil((end - start) * config.fps / 2))
        times = tuple(min(last, start + k / config.fps) for k in range(count))
        windows.append(Window(start, end, times))
    return windows


@dataclass
class Reread:
    """The windows' decoded frames.

    Args:
        frames (list[list[SampledFrame]]): per window, its frames in time order.
        decoded_frames (int): frames the decoder produced to get them (what re-reading cost).
    """

    windows: list[Window]
    frames: list[list[SampledFrame]]
    decoded_frames: int
    seconds: float


def read_windows(video_path: str | Path, windows: list[Window], sampling: SamplingConfig) -> Reread:
    """Decode the windows' frames only (`sample_frames(times=...)`), sized by `sampling`."""
    started = time.perf_counter()
    times = [t for window in windows for t in window.times]
    video = sample_frames(video_path, sampling, times=times)
    try:
        frames = list(video)
    finally:
        video.close()
    per_window, at = [], 0
    for window in windows:
        per_window.append(frames[at : at + len(window.times)])
        at += len(window.times)
    return Reread(windows, per_window, video.decoded_frames, time.perf_counter() - started)


def caption(window: Window) -> str:
    """The times a re-read clip covers, as the prompt states them."""
    return f"From {_clock(window.start)} to {_clock(window.end)}:"


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{seconds % 60:04.1f}"


@torch.inference_mode()
def focus_steps(
    loaded: LoadedModel, artifact: CompressedKV, reread: Reread, config: FocusConfig
) -> Steps[CompressedKV]:
    """Encode the re-read windows (a step each) and prefill them after the cached video (a step), into a
    copy of the artifact's cache -> a `CompressedKV` to answer from, not to store. Its `token_frames` give
    each window token the sampled frame nearest to it (text between the clips: -1), so the evidence of an
    answer from it covers the windows too; `metadata["focus"]` says what was re-read."""
    use_adaretake_attention(loaded)
    timer = StageTimer()
    table = normalisation_table(loaded.vision)
    frames_per_grid = loaded.vision.temporal_patch_size
    clips = []  # (caption ids, embeds [tokens, hidden], grid_thw, first frame time of each grid)
    for window, frames in zip(reread.windows, reread.frames, strict=True):
        with timer.stage("vision"):
            inputs = patchify_frames([f.image for f in frames], loaded.vision, table)
            pixels = inputs.pixel_values_videos.to(loaded.device, loaded.dtype)
            grid = inputs.video_grid_thw.to(loaded.device)
            embeds = loaded.model.model.get_video_features(pixels, grid).pooler_output[0]
        grid_times = [f.timestamp for f in frames[::frames_per_grid]]
        ids = loaded.tokenizer.encode(VISION_END + caption(window) + VISION_START, add_special_tokens=False)
        clips.append((ids, embeds, tuple(inputs.video_grid_thw[0].tolist()), grid_times))
        yield None

    with timer.stage("prefill"):
        pieces, positions, frames_of_tokens = [], [], []
        position = artifact.next_position
        seconds_per_grid = frames_per_grid / config.fps
        for ids, embeds, grid_thw, grid_times in clips:
            # The clip's own M-RoPE positions (caption, then video), shifted to continue the sequence.
            clip_positions = (
                multimodal_position_ids(loaded, len(ids), grid_thw, seconds_per_grid, 0) + position
            )
            position = int(clip_positions.max()) + 1
            pieces += [embed_tokens(loaded, ids), embeds[None].to(loaded.dtype)]
            positions.append(clip_positions)
            tokens_per_grid = embeds.shape[0] // grid_thw[0]
            nearest = [_nearest(artifact.timestamps, t) for t in grid_times]
            frames_of_tokens += [-1] * len(ids) + [f for f in nearest for _ in range(tokens_per_grid)]
        inputs_embeds = torch.cat(pieces, dim=1)  # [1, segment, hidden]
        cache = cache_from_artifact(loaded, artifact, extra_tokens=inputs_embeds.shape[1])
        forward(loaded, inputs_embeds, torch.cat(positions, dim=1), cache)
    yield None

    segment = torch.tensor(frames_of_tokens, dtype=torch.int32)
    focus = {
        "windows": [[round(w.start, 3), round(w.end, 3)] for w in reread.windows],
        "frames": sum(len(frames) for frames in reread.frames),
        "decoded_frames": reread.decoded_frames,
        "fps": config.fps,
        "frame_size": list(reread.frames[0][0].image.shape[1::-1]),  # [width, height]
        "tokens": int(segment.numel()),
        "seconds": {"decode": reread.seconds, **timer.seconds},
    }
    return CompressedKV(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        token_frames=[torch.cat([frames, segment]) for frames in artifact.token_frames],
        next_position=position,
        timestamps=list(artifact.timestamps),
        metadata={**artifact.metadata, "focus": focus},
    )


def _nearest(timestamps: list[float], t: float) -> int:
    """Index of the sampled frame nearest to second `t`."""
    at = bisect.bisect_left(timestamps, t)
    candidates = [i for i in (at - 1, at) if 0 <= i < len(timestamps)]
    return min(candidates, key=lambda i: abs(timestamps[i] - t))


Ask = Callable[[CompressedKV, int], CachedAnswer]


def answer_focused(
    loaded: LoadedModel,
    artifact: CompressedKV,
    video_path: str | Path,
    ask: Ask,
    *,
    config: FocusConfig = FocusConfig(),
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 128,
    run: Callable[[StepFactory], object] = run_here,
) -> CachedAnswer:
    """A focused answer (see the module's docstring) -> its `CachedAnswer`, whose `focus` says what was
    re-read and whose timings add "focus_prefill" (the first pass), "focus_decode", "focus_vision" and
    "focus_video_prefill".

    Args:
        ask: `ask(artifact, max_new_tokens)` answers the question from a cache (`answer_from_artifact`, or
            the scheduler's `submit_answer(...).result()`); called with 0 tokens for the first pass.
        sampling (SamplingConfig): the compression's, which `config` adapts for the windows.
        run: runs the model's work (`run_here`, or a `Scheduler`'s `run`); decoding happens in this thread.
    """
    if not Path(video_path).is_file():
        raise FileNotFoundError(f"{video_path}: a focused answer re-reads the video, and its file is gone")
    first = ask(artifact, 0)
    duration = artifact.metadata.get("report", {}).get("duration") or artifact.timestamps[-1]
    moments = distinct_moments(first.timeline, config.moments, config.window)
    windows = focus_windows([t for t, _ in moments], duration, config)
    reread = read_windows(video_path, windows, config.sampling(sampling))
    focused = run(lambda relay: focus_steps(loaded, artifact, reread, config))
    second = ask(focused, max_new_tokens)
    timeline = [(t, (a + b) / 2) for (t, a), (_, b) in zip(first.timeline, second.timeline, strict=True)]
    focus = focused.metadata["focus"]
    seconds = focus["seconds"]
    timings = {
        **second.timings,
        "focus_prefill": first.timings.get("prefill", 0.0),
        "focus_decode": seconds["decode"],
        "focus_vision": seconds.get("vision", 0.0),
        "focus_video_prefill": seconds.get("prefill", 0.0),
    }
    facts = {name: value for name, value in focus.items() if name != "seconds"}
    facts["moments"] = [[t, share] for t, share in moments]
    return dataclasses.replace(
        second,
        timeline=timeline,
        top_moments=top_moments(timeline, len(second.top_moments)),
        timings=timings,
        focus=facts,
    )
