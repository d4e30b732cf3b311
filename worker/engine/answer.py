"""Uncompressed answering: every video token goes into the cache. The reference the compressed engine is
checked against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.engine.config import SamplingConfig
from worker.engine.decode import VideoInfo, probe, sample_frames
from worker.engine.generate import embed_tokens, forward, greedy_decode, multimodal_position_ids, new_cache
from worker.engine.models import LoadedModel
from worker.engine.prompt import build_prompt
from worker.engine.timing import StageTimer
from worker.engine.vision import concat_slices, encode_slices, seconds_per_grid


@dataclass
class Answer:
    """A generated answer and what it cost.

    Args:
        timings (dict[str, float]): seconds per stage: "decode" (video) and "preprocess" (in the decoding
            thread), "wait" (for that thread), "vision", "prefill", "generate".
    """

    text: str
    token_ids: list[int]
    num_frames: int
    num_video_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def answer_uncompressed(
    loaded: LoadedModel,
    video_path: str | Path,
    question: str,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 128,
    slice_grids: int = 64,
    info: VideoInfo | None = None,
    on_frames: Callable[[int], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> Answer:
    """Sample, encode and prefill the whole video plus the question, then decode greedily.

    Args:
        info (VideoInfo): from `probe(video_path, sampling)`, if the caller already has it.
        on_frames / on_text / on_step: progress (frames encoded), streamed text and per-step logits.
    """
    timer = StageTimer()
    info = info or probe(video_path, sampling)
    frames = sample_frames(video_path, sampling)
    video = concat_slices(
        encode_slices(loaded, frames, slice_grids=slice_grids, timer=timer, on_frames=on_frames)
    )
    prompt = build_prompt(loaded.tokenizer, question)

    with timer.stage("prefill"):
        spg = seconds_per_grid(info, sampling, loaded.vision.temporal_patch_size)
        position_ids = multimodal_position_ids(
            loaded, len(prompt.text0_ids), video.grid_thw, spg, len(prompt.text1_ids)
        )
        inputs_embeds = torch.cat(
            [
                embed_tokens(loaded, prompt.text0_ids),
                video.embeds[None].to(loaded.dtype),
                embed_tokens(loaded, prompt.text1_ids),
            ],
            dim=1,
        )  # [1, seq, hidden]
        cache = new_cache(loaded)
        logits = forward(loaded, inputs_embeds, position_ids, cache)

    with timer.stage("generate"):
        next_position = int(position_ids.max()) + 1
        token_ids = greedy_decode(loaded, cache, logits, next_position, max_new_tokens, on_text, on_step)

    return Answer(
        text=loaded.tokenizer.decode(token_ids, skip_special_tokens=True),
        token_ids=token_ids,
        num_frames=len(video.timestamps),
        num_video_tokens=video.embeds.shape[0],
        timings=dict(timer.seconds),
    )
