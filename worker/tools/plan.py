"""Sizing before buying: the accelerator memory, artifact bytes and compute that indexing a video takes.

A model of what `worker.engine.engine.compress_video` and `answer_from_artifact` hold at their peak, from a
model's shape (`worker.tools.shapes`, or a checkpoint's config.json), the video's length and the compression
settings. No torch: an operator runs `videoqa plan` on any machine. Every term names the tensors it counts;
`bench/plan.py` measures them against real runs at reduced depth.

Peak memory = weights + max over the three phases of what they hold besides the weights:
    vision     one slice of `vision_slice_grids` temporal grids through the tower (pixels, one block's
               activations, the slice's output); the whole video is encoded before the first prefill and
               its features are gathered in host memory (`Plan.host_features`), not on the device
    prefill    the cache (text0, what earlier chunks kept, this chunk and the guide prompt, all layers),
               plus one decoder layer's activations over the chunk and the guide prompt
    answer     the cache of the artifact, plus one layer's activations over the question
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from worker.engine.config import SamplingConfig
from worker.engine.decode import sample_times, target_size
from worker.tools.shapes import ModelShape

GIB = 1024**3
CHANNELS = 3  # RGB pixels into the patch embedding
# Tokens around the video with the Qwen tokenizer and chat template: text0 (system prompt, user header,
# <|vision_start|>) and the default guide prompt (ADARETAKE.md section 6) as text1. Both are measured by
# the engine at run time; here they only add a few KiB.
TEXT0_TOKENS = 15
GUIDE_TOKENS = 25
QUESTION_TOKENS = 64


@dataclass(frozen=True)
class Workload:
    """What is indexed, and how.

    Args:
        duration (float): seconds of video.
        width (int): the video's display width (height likewise); only the aspect and size matter.
        sampling (SamplingConfig): fps, frame cap, long side.
        budget (int): the context budget M in tokens (text0 included).
        chunk_frames (int): frames per prefill chunk.
        temporal_allocation (str): "paper" and "none" hold the cache to the budget; "reference" may keep
            up to twice it.
        dtype_bytes (int): 2 for bf16/fp16 weights, activations and cache.
        vision_slice_grids (int): temporal grids per vision forward (`worker.engine.vision`'s
            VISION_SLICE_GRIDS).
    """

    duration: float
    width: int = 1280
    height: int = 720
    sampling: SamplingConfig = SamplingConfig()
    budget: int = 16_000
    chunk_frames: int = 32
    temporal_allocation: str = "paper"
    dtype_bytes: int = 2
    vision_slice_grids: int = 16
    text0_tokens: int = TEXT0_TOKENS
    guide_tokens: int = GUIDE_TOKENS
    question_tokens: int = QUESTION_TOKENS


@dataclass(frozen=True)
class Plan:
    """Predicted sizes in bytes (and counts) for one model and workload."""

    frames: int
    frame_size: tuple[int, int]
    video_tokens: int
    chunk_tokens: int
    kept_tokens: int  # per layer, text0 included, after compression
    weights: int
    weights_per_layer: int
    kv_bytes_per_token: int  # all layers
    vision_peak: int
    host_features: int  # the whole video's vision features, gathered in host memory before prefill
    prefill_cache: int
    prefill_activations: int
    answer_peak: int
    artifact_bytes: int
    flops: dict[str, float]

    @property
    def prefill_peak(self) -> int:
        return self.prefill_cache + self.prefill_activations

    @property
    def peak(self) -> int:
        """Weights plus the largest phase."""
        return self.weights + max(self.vision_peak, self.prefill_peak, self.answer_peak)


# ---- parameters ------------------------------------------------------------------------------------


def text_parameters(text: dict) -> tuple[int, int]:
    """Parameters of a Qwen2 text model: (per decoder layer, outside the layers: embedding, final norm and
    the untied lm_head)."""
    h, i, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    d = h // heads
    # q, k and v have biases, o_proj has none
    attention = (h * heads * d + heads * d) + 2 * (h * kv_heads * d + kv_heads * d) + heads * d * h
    layer = attention + 3 * h * i + 2 * h  # gate, up, down (no bias); two RMSNorms
    return layer, 2 * v * h + h


def vision_parameters(family: str, vision: dict) -> int:
    """The whole vision tower: patch embedding, blocks and the 2x2 merger into the text width."""
    if family == "qwen2_5_vl":
        e, mlp, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
        block = 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + 2 * (e * mlp + mlp) + (mlp * e + e)  # RMSNorms
        norm = e
    else:
        e, out = vision["embed_dim"], vision["hidden_size"]
        mlp = e * vision["mlp_ratio"]
        block = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * mlp + mlp) + (mlp * e + e)  # LayerNorms
        norm = 2 * e
    patch = vision["temporal_patch_size"] * vision["patch_size"] ** 2 * CHANNELS * e  # no bias
    merged = e * vision["spatial_merge_size"] ** 2
    merger = norm + (merged * merged + merged) + (merged * out + out)
    return patch + vision["depth"] * block + merger


def parameters(shape: ModelShape) -> int:
    layer, outside = text_parameters(shape.text)
    return shape.num_layers * layer + outside + vision_parameters(shape.family, shape.vision)


def kv_bytes_per_token_layer(text: dict, dtype_bytes: int = 2) -> int:
    """Keys and values of one token in one layer: 2 x kv_heads x head_dim x dtype bytes."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_key_value_heads"] * head_dim * dtype_bytes


# ---- the plan --------------------------------------------------------------------------------------


def plan(shape: ModelShape, work: Workload) -> Plan:
    """Predict memory, artifact size and FLOPs for indexing `work` with a model of `shape`, then answering."""
    text, vision, b = shape.text, shape.vision, work.dtype_bytes
    layers = shape.num_layers
    h, i = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = h // heads
    patch, merge, tps = vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]

    frames = len(sample_times(work.duration, work.sampling))
    out_w, out_h = target_size(work.width, work.height, work.sampling.long_side, work.sampling.size_multiple)
    grid_t, grid_h, grid_w = math.ceil(frames / tps), out_h // patch, out_w // patch
    tokens_per_grid = (grid_h // merge) * (grid_w // merge)
    video_tokens = grid_t * tokens_per_grid
    chunk_grids = work.chunk_frames // tps
    chunk_tokens = min(grid_t, chunk_grids) * tokens_per_grid
    video_budget = max(1, work.budget - work.text0_tokens)
    # The reference variant is not held to the budget: up to twice it (its heavy-hitter factor caps at 2).
    kept_video = min(video_tokens, video_budget * (2 if work.temporal_allocation == "reference" else 1))
    kept = work.text0_tokens + kept_video

    layer_params, _ = text_parameters(text)
    weights = parameters(shape) * b
    kv_layer = kv_bytes_per_token_layer(text, b)

    # Prefill: during the last chunk's forward every layer holds text0, what the earlier chunks kept (at
    # most the budget), the chunk and the guide prompt. One layer's activations over S = chunk + guide:
    # the chunk's embeddings and the model input [S, h]; residual and normed hidden [S, h]; then either the
    # MLP (act(gate), up and their product [S, i]) or the attention (q, k, v and their rotated copies,
    # the bottom-right mask [S, kv_len] bool, and the torch.cat that grows the layer's cache: old and new
    # keys and values for a moment).
    seq = chunk_tokens + work.guide_tokens
    past = work.text0_tokens + min(video_tokens - chunk_tokens, kept_video)
    kv_len = past + seq
    prefill_cache = layers * kv_len * kv_layer
    inputs = 2 * seq * h * b
    mlp = 2 * seq * h * b + 3 * seq * i * b
    attention = (
        2 * seq * h * b
        + 2 * seq * (heads + 2 * kv_heads) * head_dim * b
        + seq * kv_len  # bool mask
        + kv_len * kv_layer  # the layer's previous keys and values while torch.cat copies them
    )
    prefill_activations = inputs + max(mlp, attention)

    # Vision: a slice of vision_slice_grids temporal grids. Pixels are patchified in fp32 and cast to the
    # model's dtype; in a block, the residual and normed hidden [patches, width] and the MLP (two
    # [patches, mlp] and their product) dominate.
    slice_grids = min(grid_t, work.vision_slice_grids)
    patches = slice_grids * grid_h * grid_w
    pixel_width = tps * patch * patch * CHANNELS
    width, mlp_width, mlp_tensors = _vision_widths(shape.family, vision)
    vision_peak = (
        patches * pixel_width * (4 + b)
        + max(2 * patches * width * b + mlp_tensors * patches * mlp_width * b, 2 * patches * width * b)
        + slice_grids * tokens_per_grid * h * b  # the slice's output embeddings, before they go to the host
    )

    # Answering: the artifact's cache, the question's tokens in one layer (MLP), and the evidence scores:
    # fp32 attention probabilities [heads, q, kv_len] and an fp32 copy of the layer's keys.
    q = work.question_tokens
    answer_peak = (
        layers * (kept + q) * kv_layer
        + 2 * q * h * b
        + max(3 * q * i * b, 2 * heads * q * (kept + q) * 4 + (kept + q) * kv_heads * head_dim * 4)
    )

    # The artifact: keys and values, one int32 frame index per cached token and layer, one float64 time per
    # sampled frame, and the safetensors header (tensor names and offsets, JSON metadata: about 16 KiB).
    artifact_bytes = layers * kept * (kv_layer + 4) + frames * 8 + 16 * 1024

    flops = _flops(shape, work, frames, grid_t, grid_h, grid_w, chunk_grids, tokens_per_grid, kept_video)
    return Plan(
        frames=frames,
        frame_size=(out_w, out_h),
        video_tokens=video_tokens,
        chunk_tokens=chunk_tokens,
        kept_tokens=kept,
        weights=weights,
        weights_per_layer=layer_params * b,
        kv_bytes_per_token=layers * kv_layer,
        vision_peak=vision_peak,
        host_features=video_tokens * h * b,
        prefill_cache=prefill_cache,
        prefill_activations=prefill_activations,
        answer_peak=answer_peak,
        artifact_bytes=artifact_bytes,
        flops=flops,
    )


def _vision_widths(family: str, vision: dict) -> tuple[int, int, int]:
    """(tower width, MLP width, MLP tensors of that width alive at once)."""
    if family == "qwen2_5_vl":
        return vision["hidden_size"], vision["intermediate_size"], 3  # act(gate), up, product
    return vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"], 2  # fc1 out, act


def _flops(shape, work, frames, grid_t, grid_h, grid_w, chunk_grids, tokens_per_grid, kept_video) -> dict:
    """Multiply-adds x 2 of the vision tower, the chunked prefill and one decoded token."""
    text = shape.text
    h = text["hidden_size"]
    layers = shape.num_layers
    layer_params, _ = text_parameters(text)
    patches = grid_t * grid_h * grid_w
    vision = 2 * vision_parameters(shape.family, shape.vision) * patches
    # Attention inside the tower: windows (Qwen2.5-VL, 8x8 patches) or whole frames, QK^T and PV.
    window = (shape.vision.get("window_size", 0) // shape.vision["patch_size"]) ** 2 or grid_h * grid_w
    width = _vision_widths(shape.family, shape.vision)[0]
    vision += 4 * patches * min(window, grid_h * grid_w) * width * shape.vision["depth"]

    prefill, cached = 0.0, work.text0_tokens
    chunks = math.ceil(grid_t / chunk_grids)
    for index in range(chunks):
        seq = min(chunk_grids, grid_t - index * chunk_grids) * tokens_per_grid + work.guide_tokens
        prefill += 2 * layer_params * seq * layers + 4 * seq * (cached + seq) * h * layers
        cached += kept_video / chunks
    kept = work.text0_tokens + kept_video
    decode = 2 * (layers * layer_params + h * text["vocab_size"]) + 4 * kept * h * layers
    return {"vision": float(vision), "prefill": float(prefill), "decode_token": float(decode)}


# ---- a checkpoint's own shape ----------------------------------------------------------------------


def shape_from_config(path: Path | str) -> ModelShape:
    """The shape of a local checkpoint, from its config.json (transformers 4.x flat or 5.x nested)."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read a model config from {config_file}: {error}") from error
    family = config.get("model_type")
    if family not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"{config_file}: model_type {family!r} is not qwen2_5_vl or qwen2_vl")
    text = config.get("text_config") or config
    vision = _vision_defaults(family) | config.get("vision_config", {})
    return ModelShape(path.name, family, str(path), str(config_file), dict(text), vision)


def _vision_defaults(family: str) -> dict:
    """What a config.json may leave out falls back to the transformers config class's 7B defaults."""
    from worker.tools.shapes import QWEN2_5_VL_7B, QWEN2_VL_7B

    return dict((QWEN2_5_VL_7B if family == "qwen2_5_vl" else QWEN2_VL_7B).vision)


# ---- the operator's table ----------------------------------------------------------------------------

DURATIONS = (("10 min", 600.0), ("1 h", 3600.0), ("3 h", 10800.0))


def sizing_table(shapes: list[ModelShape], memory_tier: int, disk_tier: int) -> str:
    """A markdown table: for each shape and duration (defaults otherwise: 2 fps, 2048-frame cap, long side
    448, 16K budget, 32-frame chunks, 720p), frames and tokens, accelerator and host memory needed,
    artifact size, and how many artifacts the memory and disk tiers hold."""
    rows = [
        "| model | video | frames | video tokens -> kept per layer | weights GiB | peak memory GiB (phase) "
        f"| host memory for the features GiB | artifact MB | artifacts in {memory_tier / GIB:.0f} GiB memory "
        f"tier | in {disk_tier / GIB:.0f} GiB disk tier | vision + prefill TFLOP |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in shapes:
        for label, seconds in DURATIONS:
            p = plan(shape, Workload(duration=seconds))
            name = shape.model_id.split("/")[-1]
            rows.append(
                f"| {name} | {label} | {p.frames} | {p.video_tokens} -> {p.kept_tokens} "
                f"| {p.weights / GIB:.1f} | {p.peak / GIB:.1f} ({peak_phase(p)}) "
                f"| {p.host_features / GIB:.1f} "
                f"| {p.artifact_bytes / 1e6:.0f} "
                f"| {memory_tier // p.artifact_bytes} | {disk_tier // p.artifact_bytes} "
                f"| {(p.flops['vision'] + p.flops['prefill']) / 1e12:.0f} |"
            )
    return "\n".join(rows)


def peak_phase(p: Plan) -> str:
    phases = {"vision": p.vision_peak, "prefill": p.prefill_peak, "answer": p.answer_peak}
    return max(phases, key=phases.get)
