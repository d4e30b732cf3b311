"""Decode, preprocess and vision-encode a video slice by slice.

Vision attention never crosses a temporal grid (2 frames), so encoding a few grids at a time is
lossless and keeps pixel memory bounded by the slice, not by the video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from worker.engine.decode import SampledFrame
from worker.engine.models import LoadedModel
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.timing import StageTimer


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
) -> Iterator[VideoSlice]:
    """Vision-encode `frames` in slices of `slice_grids` temporal grids.

    Args:
        loaded (LoadedModel): the model whose vision tower encodes.
        frames: sampled frames, all of one size (the decoder guarantees it).
        slice_grids (int): temporal grids (of `temporal_patch_size` frames) per vision forward.
        timer (StageTimer): charged with "decode" (waiting on `frames`) and "vision" (preprocess + tower).
        on_frames: called with the number of frames in each slice, for progress reporting.
    """
    timer = timer or StageTimer()
    table = normalisation_table(loaded.vision)
    slice_frames = slice_grids * loaded.vision.temporal_patch_size
    frames = timer.timed("decode", frames)
    while batch := list(islice(frames, slice_frames)):
        with timer.stage("vision"):
            inputs = patchify_frames([f.image for f in batch], loaded.vision, table)
            pixels = inputs.pixel_values_videos.to(loaded.device, loaded.dtype)
            grid = inputs.video_grid_thw.to(loaded.device)
            embeds = loaded.model.model.get_video_features(pixels, grid).pooler_output[0]
        if on_frames is not None:
            on_frames(len(batch))
        yield VideoSlice(embeds, tuple(inputs.video_grid_thw[0].tolist()), [f.timestamp for f in batch])


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
