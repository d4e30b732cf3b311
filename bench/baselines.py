"""The compression baselines the engine does not offer, shared by the benchmarks: random eviction from an
uncompressed artifact, and uniform frame subsampling to a token budget."""

import dataclasses
from pathlib import Path

import torch

from worker.engine.adaretake import CompressionConfig
from worker.engine.artifact import CompressedKV
from worker.engine.engine import compress_video
from worker.engine.models import LoadedModel

KEEP_ALL = 10**9  # a budget no video here reaches: global ratio 1, every token kept


def evict_randomly(
    full: CompressedKV, text0: int, counts: list[int], generator: torch.Generator
) -> CompressedKV:
    """Keep text0 and `counts[l]` video tokens of layer l, drawn uniformly without replacement, in temporal
    order. The kept K/V come from a full prefill, so each saw the whole past: an advantage over the chunked
    compressed prefill, whose later chunks only saw what earlier chunks kept."""
    keys, values, frames = [], [], []
    for layer_idx, count in enumerate(counts):
        video = full.lengths[layer_idx] - text0
        chosen = torch.randperm(video, generator=generator)[:count].sort().values + text0  # [count]
        index = torch.cat([torch.arange(text0), chosen])
        keys.append(full.keys[layer_idx][:, :, index])  # [1, kv_heads, text0 + count, head_dim]
        values.append(full.values[layer_idx][:, :, index])
        frames.append(full.token_frames[layer_idx][index])
    return CompressedKV(keys, values, frames, full.next_position, list(full.timestamps), {})


def subsampled(
    loaded: LoadedModel, video: Path, config: CompressionConfig, video_budget: int, tokens_per_grid: int
) -> CompressedKV:
    """The uncompressed cache of the video sampled at fewer frames, evenly over its whole length: as many
    temporal grids (2 frames) as fit the budget, at least one. `max_frames` lowers the rate the way a long
    video's frame cap does, so Qwen2.5-VL's time axis still spans the real duration."""
    frames = 2 * max(1, video_budget // tokens_per_grid)
    sampling = dataclasses.replace(config.sampling, max_frames=frames)
    return compress_video(loaded, video, dataclasses.replace(config, sampling=sampling, budget=KEEP_ALL))


def kept_video_tokens(artifact: CompressedKV, text0: int) -> float:
    """Video tokens in the cache, mean over layers."""
    return sum(n - text0 for n in artifact.lengths) / artifact.num_layers
