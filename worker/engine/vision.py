"""Decode, preprocess and vision-encode a video slice by slice.

Vision attention never crosses a temporal grid (2 frames), so encoding a few grids at a time is
lossless and keeps pixel memory bounded by the slice, not by the video.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch

from worker.engine.config import SamplingConfig
from worker.engine.decode import SampledFrame, VideoInfo, probe, sample_frames
from worker.engine.features import VideoLayout, VisionFeatures
from worker.engine.models import LoadedModel
from worker.engine.pipeline import Prefetcher
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.steps import Blocked, Steps, drive
from worker.engine.timing import StageTimer

VISION_SLICE_GRIDS = 16  # temporal grids per vision forward in `encode_video`: 32 frames, one default chunk
PREFETCH_SLICES = 2  # slices decoded ahead of the tower: enough to hide decoding jitter, bounded memory
DECODE_THREAD = "videoqa-decode"


@dataclass
class VideoSlice:
    """Vision-tower output for consecutive frames.

    Args:
        embeds (torch.Tensor): `[grid_t * grid_h * grid_w / merge**2, hidden_size]` LLM-ready video tokens.
        grid_thw (tuple[int, int, int]): the slice's grid in patches.
        timestamps (list[float]): seconds of each real frame in the slice.
    """

    embeds: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: list[float]


@torch.inference_mode()
def encode_slices(
    loaded: LoadedModel,
    frames: Iterable[SampledFrame],
    *,
    slice_grids: int = 64,
    timer: StageTimer | None = None,
    on_frames: Callable[[int], None] | None = None,
    prefetch: int = PREFETCH_SLICES,
    poll: bool = False,
) -> Iterator[VideoSlice | Blocked]:
    """Vision-encode `frames` in slices of `slice_grids` temporal grids. Decoding and preprocessing run
    ahead in a thread (`Prefetcher`), at most `prefetch` slices ahead, while the tower encodes; close the
    generator (or exhaust it) to stop that thread.

    Args:
        loaded (LoadedModel): the model whose vision tower encodes.
        frames: sampled frames, all of one size (the decoder guarantees it); iterated in the thread.
        slice_grids (int): temporal grids (of `temporal_patch_size` frames) per vision forward.
        timer (StageTimer): charged with "decode" (waiting on `frames`) and "preprocess" (patchify), both in
            the thread, "vision" (the tower) and "wait" (the tower waiting for the thread).
        on_frames: called with the number of frames in each slice, for progress reporting.
        poll (bool): yield a `Blocked` instead of waiting when the next slice is not decoded yet, so that
            the caller can do other work meanwhile (see `worker.engine.steps`); its wait is charged to "wait".
    """
    timer = timer or StageTimer()
    batches = _patchified(frames, loaded, slice_grids * loaded.vision.temporal_patch_size, timer)
    with Prefetcher(batches, depth=prefetch, name=DECODE_THREAD) as ready:

        def wait(timeout: float | None) -> bool:
            with timer.stage("wait"):
                return ready.wait_ready(timeout)

        while True:
            if poll and not ready.wait_ready(0):
                yield Blocked(wait)
                continue
            with timer.stage("wait"):
                batch = next(ready, None)
            if batch is None:
                return
            inputs, timestamps = batch
            with timer.stage("vision"):
                pixels = inputs.pixel_values_videos.to(loaded.device, loaded.dtype)
                grid = inputs.video_grid_thw.to(loaded.device)
                embeds = loaded.model.model.get_video_features(pixels, grid).pooler_output[0]
            if on_frames is not None:
                on_frames(len(timestamps))
            yield VideoSlice(embeds, tuple(inputs.video_grid_thw[0].tolist()), timestamps)


def _patchified(frames: Iterable[SampledFrame], loaded: LoadedModel, slice_frames: int, timer: StageTimer):
    """(patchified inputs, timestamps) per slice of `slice_frames` frames: the CPU half of encoding."""
    table = normalisation_table(loaded.vision)
    frames = timer.timed("decode", frames)
    while batch := list(islice(frames, slice_frames)):
        with timer.stage("preprocess"):
            inputs = patchify_frames([f.image for f in batch], loaded.vision, table)
        yield inputs, [f.timestamp for f in batch]


def concat_slices(slices: Iterable[VideoSlice]) -> VideoSlice:
    """Join consecutive slices of one video into a single one."""
    slices = list(slices)
    if not slices:
        raise ValueError("no frames to encode")
    _, grid_h, grid_w = slices[0].grid_thw
    return VideoSlice(
        embeds=torch.cat([s.embeds for s in slices]),
        grid_thw=(sum(s.grid_thw[0] for s in slices), grid_h, grid_w),
        timestamps=[t for s in slices for t in s.timestamps],
    )


def seconds_per_grid(info: VideoInfo, sampling: SamplingConfig, temporal_patch_size: int) -> float:
    """Seconds one temporal grid spans: Qwen2.5-VL places video tokens on an absolute time axis."""
    frame_interval = max(1 / sampling.fps, info.duration / sampling.max_frames)  # capped videos spread out
    return temporal_patch_size * frame_interval


def video_layout(loaded: LoadedModel, video_path, sampling: SamplingConfig) -> VideoLayout:
    info = probe(video_path, sampling)
    spec = loaded.vision
    grid_h, grid_w = info.out_height // spec.patch_size, info.out_width // spec.patch_size
    return VideoLayout(
        num_frames=info.num_samples,
        duration=info.duration,
        grid_thw=(math.ceil(info.num_samples / spec.temporal_patch_size), grid_h, grid_w),
        tokens_per_grid=(grid_h // spec.merge_size) * (grid_w // spec.merge_size),
        seconds_per_grid=seconds_per_grid(info, sampling, spec.temporal_patch_size),
    )


def encode_video(*args, **kwargs) -> VisionFeatures:
    """Decode and vision-encode a video once, in this thread: `encode_steps` (same arguments) run to
    completion."""
    return drive(encode_steps(*args, **kwargs))


def encode_steps(
    loaded: LoadedModel,
    video_path: str | Path,
    sampling: SamplingConfig,
    *,
    timer: StageTimer | None = None,
    on_progress: Callable[[str, float], None] | None = None,
    on_frame: Callable[[SampledFrame], None] | None = None,
) -> Steps[VisionFeatures]:
    """Decode and vision-encode a video once, one vision slice per step (`worker.engine.steps`). The
    embeddings are gathered on the CPU (so accelerator memory stays bounded by one slice), in the model's
    dtype.

    Args:
        timer (StageTimer): charged with "decode" and "vision".
        on_progress: called with ("decoding", 0) first, then ("encoding", fraction of frames done).
        on_frame: called with every sampled frame as it is decoded (e.g. to write thumbnails), in the
            decoding thread; what it raises fails the encoding.
    """
    timer = timer or StageTimer()
    progress = on_progress or (lambda stage, fraction: None)
    progress("decoding", 0.0)  # frames are decoded as the encoder asks for them: encoding reports next
    layout = video_layout(loaded, video_path, sampling)
    decoded = sample_frames(video_path, sampling)  # once exhausted, it knows what damage it met
    frames = decoded if on_frame is None else _tapped(decoded, on_frame)
    pieces, timestamps = [], []
    # Closed on any exit, so the decoding thread stops with it (an early exit leaves it suspended).
    slices = encode_slices(loaded, frames, slice_grids=VISION_SLICE_GRIDS, timer=timer, poll=True)
    with contextlib.closing(decoded), contextlib.closing(slices):
        for piece in slices:
            if isinstance(piece, Blocked):
                yield piece
                continue
            pieces.append(piece.embeds.cpu())
            timestamps.extend(piece.timestamps)
            progress("encoding", len(timestamps) / max(1, layout.num_frames))
            yield None
    return VisionFeatures(
        embeds=torch.cat(pieces),
        timestamps=timestamps,
        layout=layout,
        metadata={
            "model_revision": loaded.revision,
            "sampling": asdict(sampling),
            "seconds": dict(timer.seconds),
            "decode": decoded.report(),
        },
    )


def _tapped(
    frames: Iterable[SampledFrame], on_frame: Callable[[SampledFrame], None]
) -> Iterator[SampledFrame]:
    for frame in frames:
        on_frame(frame)
        yield frame
