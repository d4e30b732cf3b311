"""Sampled frames -> Qwen2-VL / Qwen2.5-VL video inputs, without torchvision.

Frames arrive already resized by the decoder (sides multiples of patch_size * merge_size), so what is
left is the stock image processor's rescale + normalise and the 2x14x14 patchify of the video processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from worker.engine.models import VisionSpec


@dataclass
class VideoInputs:
    """One slice of a video, ready for the vision tower.

    Args:
        pixel_values_videos (torch.Tensor):
            `[grid_t * grid_h * grid_w, channels * temporal_patch * patch * patch]`,
            float32, in the vision tower's patch order.
        video_grid_thw (torch.Tensor): `[1, 3]` int64, (grid_t, grid_h, grid_w) in patches.
        num_frames (int): real frames in the slice (the last one is repeated to fill a temporal patch).
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    num_frames: int


def normalisation_table(spec: VisionSpec) -> torch.Tensor:
    """Every normalised value a uint8 pixel can take, per channel: `[3, 256]` float32.

    Computed exactly as the stock processor does (rescale in float64, cast to float32, then
    (x - mean) / std in float32), so a lookup reproduces it bit for bit and costs one gather.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [256]
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None]  # [3, 1]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None]
    return torch.from_numpy((levels[None, :] - mean) / std)  # [3, 256]


def patchify_frames(
    frames: Sequence[np.ndarray] | np.ndarray, spec: VisionSpec, table: torch.Tensor
) -> VideoInputs:
    """Normalise and patchify frames of one size into the vision tower's input layout.

    Args:
        frames: `num_frames` arrays `[height, width, 3]` uint8 RGB; height and width multiples of
            `spec.patch_size * spec.merge_size`.
        spec (VisionSpec): the checkpoint's patch sizes and normalisation.
        table (torch.Tensor): from `normalisation_table(spec)`.
    """
    video = torch.from_numpy(
        np.stack(frames) if not isinstance(frames, np.ndarray) else frames
    )  # [n, H, W, 3]
    num_frames, height, width, channels = video.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {width}x{height} is not a multiple of {p * m}")
    if pad := -num_frames % tp:  # an odd tail repeats the last frame, as the stock video processor does
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    grid_t, grid_h, grid_w = video.shape[0] // tp, height // p, width // p

    channel_index = torch.arange(channels).view(1, 1, 1, channels)
    pixels = table[channel_index, video.long()]  # [T, H, W, C] float32
    patches = pixels.view(grid_t, tp, grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> [grid_t, h-blocks, w-blocks, m, m, C, tp, p, p]: merge groups contiguous, as the tower expects
    patches = patches.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return VideoInputs(
        pixel_values_videos=flat,
        video_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]]),
        num_frames=num_frames,
    )
