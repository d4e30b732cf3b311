"""Benchmark: the first answer about a video (decode, vision, compressed prefill, answer) against a
follow-up answered from the cached artifact on disk, for 1, 5 and 10 minutes of 720p video.

The model is loaded once, in process. Each video gets a fresh cache directory: the first ask misses and
compresses; the follow-up is a new request that finds the artifact on disk (hash the file, load the
artifact, prefill the question, decode). Run: python bench/followup.py [--model PATH]
"""

import argparse
import datetime
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, looped_bunny, write_section

from worker.engine.adaretake import PRESETS
from worker.engine.engine import answer_from_artifact, get_or_compress
from worker.engine.models import load_model
from worker.engine.storage import DiskStore
from worker.tiny import make_tiny

SECTION = "## Follow-up answers from the cache (bench/followup.py)"
MINUTES = (1, 5, 10)
MAX_NEW_TOKENS = 16


def timed_ask(loaded, store, video: Path, config, question: str) -> dict:
    """One request: the artifact (compressed or loaded), then the answer. Seconds and sizes."""
    start = time.perf_counter()
    first_token = []
    result = get_or_compress(loaded, store, video, config)
    answered = time.perf_counter()
    answer_from_artifact(
        loaded,
        result.artifact,
        question,
        max_new_tokens=MAX_NEW_TOKENS,
        on_step=lambda logits: first_token or first_token.append(time.perf_counter()),
    )
    end = time.perf_counter()
    return {
        "hit": result.hit,
        "ttft": first_token[0] - start,
        "total": end - start,
        "artifact_s": answered - start,
        "load": result.seconds.get("load", 0.0),
        "hash": result.seconds.get("hash", 0.0),
        "bytes": result.nbytes,
        "frames": result.artifact.metadata["report"]["frames"],
        "tokens_before": result.artifact.metadata["report"]["video_tokens_before"],
        "tokens_after": result.artifact.metadata["report"]["video_tokens_after"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint (default: the tiny Qwen2.5-VL built under build/bench)")
    parser.add_argument(
        "--followups", type=int, default=3, help="follow-ups per video; the median is reported"
    )
    args = parser.parse_args()
    model = args.model or str(make_tiny(ROOT / "build" / "bench" / "tiny")["qwen2_5_vl"])
    loaded = load_model(model)
    config = PRESETS["paper-7b"]
    videos = {minutes: looped_bunny(minutes * 60) for minutes in MINUTES}

    rows = []
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as scratch:
        # Warm-up on a throwaway store: first-call costs (allocator, kernels) are not the cache's doing.
        timed_ask(loaded, DiskStore(Path(scratch) / "warmup"), videos[1], config, "Warm up.")
        for minutes, video in videos.items():
            store = DiskStore(Path(scratch) / f"{minutes}min")
            cold = timed_ask(loaded, store, video, config, "What happens in this video?")
            follow = [timed_ask(loaded, store, video, config, f"What happens after minute {i}?")
                      for i in range(args.followups)]  # fmt: skip
            assert not cold["hit"] and all(f["hit"] for f in follow)
            median = {
                key: statistics.median(f[key] for f in follow) for key in ("ttft", "total", "load", "hash")
            }
            # The process's high-water mark, after videos of growing length: flat when memory follows
            # the budget and the chunk size rather than the video's length.
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append({"minutes": minutes, "cold": cold, "follow": median, "peak_mib": peak_mib})
            print(f"{minutes} min: cold {cold['total']:.2f}s, follow-up {median['total']:.3f}s "
                  f"({cold['total'] / median['total']:.0f}x)")  # fmt: skip

    table = [
        "| video | frames | video tokens (before -> after, per layer) | artifact MB | first answer: TTFT s "
        "| first answer: total s | follow-up: TTFT s | follow-up: total s | of which hash + load s "
        "| total speed-up | process peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cold, follow = row["cold"], row["follow"]
        table.append(
            f"| {row['minutes']} min | {cold['frames']} "
            f"| {cold['tokens_before']} -> {cold['tokens_after']:.0f} "
            f"| {cold['bytes'] / 1e6:.1f} | {cold['ttft']:.2f} | {cold['total']:.2f} | {follow['ttft']:.3f} "
            f"| {follow['total']:.3f} | {follow['hash']:.3f} + {follow['load']:.3f} "
            f"| {cold['total'] / follow['total']:.0f}x | {row['peak_mib']:.0f} |"
        )
    five, ten = (next(row for row in rows if row["minutes"] == m) for m in (5, 10))
    speedup = ten["cold"]["total"] / ten["follow"]["total"]
    section = "\n".join(
        [
            SECTION,
            "",
            f"Run on {datetime.date.today().isoformat()} with `python bench/followup.py` on a "
            f"{platform.machine()} CPU ({torch.get_num_threads()} torch threads), no GPU; model "
            f"`{Path(model).name if not args.model else model}` ({loaded.family}, random weights; the tiny "
            "checkpoint unless `--model` says otherwise), loaded once in process.",
            "",
            "- Videos: the Big Buck Bunny 720p clip looped to 1, 5 and 10 minutes (build/bench/).",
            "- Settings: the `paper-7b` preset (2 fps, up to 2048 frames, long side 448, budget 16 000, "
            "32-frame chunks, adakv + paper temporal allocation).",
            "- First answer: a cache miss: hash, decode, vision, compressed prefill, store the artifact, "
            f"then answer ({MAX_NEW_TOKENS} new tokens at most). Follow-up: a new question on the same "
            "video: hash the file, load the artifact from disk, prefill the question, answer; median of "
            f"{args.followups}.",
            "- TTFT: from the request's start to the first token's logits.",
            "- Process peak RSS: the benchmark process's high-water mark (ru_maxrss) after each video, in "
            "order of length; model, interpreter and libraries included.",
            "",
            *table,
            "",
            f"10 minutes: the follow-up's total time is {speedup:.0f}x shorter than the first answer's "
            "(target: at least 50x). The process's peak memory grew by "
            f"{ten['peak_mib'] - five['peak_mib']:.0f} MiB from the 5-minute to the 10-minute video, which "
            "has twice the frames and tokens before compression.",
            "",
        ]
    )
    print(section)
    write_section(SECTION, section)


if __name__ == "__main__":
    main()
