"""Benchmark: the first answer about a video (decode, vision, compressed prefill, answer) against a
follow-up answered from the cached artifact on disk, for 1, 5 and 10 minutes of 720p video.

The model is loaded once, in process. Each video gets a fresh cache directory: the first ask misses and
compresses; the follow-up is a new request that finds the artifact on disk (hash the file, load the
artifact, prefill the question, decode). Run: python bench/followup.py [--model PATH]

Three more parts, each its own section of docs/benchmarks.md, on the 10-minute video (`--minutes`):

    python bench/followup.py --part decode-step      # per-token decode vs transformers' own loop
    python bench/followup.py --part indexings        # peak RSS over 20 consecutive indexings
    python bench/followup.py --part question-guided  # question-guided asks: stored features vs recompute
    python bench/followup.py --part overlap          # index wall vs the sum of its stages

The sections name the allocator the process ran on: run them as the worker runs, e.g.
`LD_PRELOAD=libjemalloc.so.2 python bench/followup.py --part indexings` (worker/serving/allocator.py).
"""

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import ROOT, looped_bunny, write_section
from procfs import memory_kib

from worker.engine.adaretake import PRESETS
from worker.engine.decode import sample_frames
from worker.engine.engine import answer_from_artifact, compress_for_question, get_or_compress
from worker.engine.models import load_model
from worker.engine.storage import DiskStore
from worker.serving.allocator import PRELOAD, allocator_in_use, with_jemalloc
from worker.tools.tiny import make_tiny

SECTION = "## Follow-up answers from the cache (bench/followup.py)"
DECODE_SECTION = "## Decode step against transformers' own loop (bench/followup.py --part decode-step)"
INDEXINGS_SECTION = "## Memory over repeated indexings (bench/followup.py --part indexings)"
GUIDED_SECTION = "## Question-guided asks from stored features (bench/followup.py --part question-guided)"
OVERLAP_SECTION = "## Index wall against the sum of its stages (bench/followup.py --part overlap)"
# Stages that do work, as `get_or_compress` times them; "wait" (the tower idle, waiting for frames) is none.
WORK_STAGES = ("hash", "decode", "preprocess", "vision", "prefill", "compress", "store")
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


def answers_part(args, model: str) -> None:
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


def publish(args, title: str, section: str) -> None:
    print(section)
    if not args.no_write:
        write_section(title, section)


def allocator() -> str:
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"allocator {allocator_in_use()}" + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")


def part_setup(args, model: str):
    """The parts' common start: the model, the paper-7b settings and the looped video."""
    return load_model(model), PRESETS["paper-7b"], looped_bunny(args.minutes * 60)


# ---- decode step --------------------------------------------------------------------------------------


def step_times(run) -> list[float]:
    """Seconds between consecutive logits of one generation: one decoding step each."""
    stamps = []
    run(lambda _logits: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def stock_loop(stock, lengths: list[int], tokens: int, on_step) -> None:
    """transformers' own decoding loop: `stock`, a separate copy of the model with its stock SDPA
    attention, and a `DynamicCache` holding as many tokens in every layer as the artifact holds on
    average, one `model(...)` call per token."""
    from transformers import DynamicCache

    text = stock.model.config.get_text_config()
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    length = round(statistics.mean(lengths))
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(0)
    for layer in range(text.num_hidden_layers):
        shape = (1, heads, length, dim)
        cache.update(*(torch.randn(shape, generator=generator, dtype=stock.dtype) for _ in "kv"), layer)
    token = torch.tensor([[stock.tokenizer.convert_tokens_to_ids("the")]])
    with torch.inference_mode():
        for step in range(tokens + 1):
            position = torch.full((3, 1, 1), length + step)
            out = stock.model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
            on_step(out.logits[0, -1])
            token = out.logits[:, -1:].argmax(-1)


def decode_step_figures(args, model: str) -> dict:
    """Step times of ours and of transformers' loop, in this process (on the allocator it started with):
    one generation of each to warm up, then one measured. The artifact comes from `args.store`, where the
    first child compressed it."""
    loaded, config, video = part_setup(args, model)
    endless = dataclasses.replace(loaded, eos_token_ids=())  # every run generates exactly `tokens`
    artifact = get_or_compress(loaded, DiskStore(Path(args.store)), video, config).artifact
    stock_model = load_model(model)  # never routed through the engine's attention
    tokens = args.tokens
    answers = []
    for _warm_up_and_measured in range(2):
        ours = step_times(lambda on_step: answers.append(answer_from_artifact(
            endless, artifact, "What happens?", max_new_tokens=tokens, on_step=on_step)))  # fmt: skip
        stock = step_times(lambda on_step: stock_loop(stock_model, artifact.lengths, tokens, on_step))
    return dict(allocator=allocator(), ours=ours, stock=stock, evidence=answers[-1].timings["evidence"],
                lengths=artifact.lengths, family=loaded.family)  # fmt: skip


def decode_step_part(args, model: str) -> None:
    if args.child:
        print(json.dumps(decode_step_figures(args, model)))
        return
    # An allocator is chosen when a process starts: a child per allocator and round, the allocators taking
    # turns (jemalloc, as the worker runs, first), so that drift on the machine hits both alike.
    unset = (PRELOAD, "MALLOC_MMAP_THRESHOLD_")
    plain = {name: value for name, value in os.environ.items() if name not in unset}
    envs = {"jemalloc": with_jemalloc(plain), "glibc malloc": plain}
    runs = {name: {"ours": [], "stock": [], "evidence": []} for name in envs}
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as store:
        options = {"--model": model, "--tokens": args.tokens, "--minutes": args.minutes, "--store": store}
        command = [sys.executable, __file__, "--part", "decode-step", "--child"]
        command += [str(part) for option in options.items() for part in option]
        for _ in range(args.runs):
            for name, env in envs.items():
                done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
                child = json.loads(done.stdout.splitlines()[-1])
                assert child["allocator"] == f"allocator {name}", child["allocator"]
                for key in ("ours", "stock"):
                    runs[name][key] += child[key]
                runs[name]["evidence"].append(child["evidence"])
                lengths, family = child["lengths"], child["family"]

    def ms(steps: list[float]) -> tuple[float, float]:
        return statistics.median(steps) * 1e3, statistics.quantiles(steps, n=10)[-1] * 1e3

    rows = []
    for name, run in runs.items():
        (mine, mine_p90), (theirs, theirs_p90) = ms(run["ours"]), ms(run["stock"])
        evidence = statistics.median(run["evidence"]) * 1e3
        share = evidence / (mine * args.tokens)
        rows.append(f"| {name} | {mine:.2f} | {mine_p90:.2f} | {theirs:.2f} | {theirs_p90:.2f} | "
                    f"{mine / theirs:.2f}x | {evidence:.1f} ({share:.0%}) |")  # fmt: skip
    worker, glibc = (ms(run["ours"])[0] for run in runs.values())
    stock_worker, stock_glibc = (ms(run["stock"])[0] for run in runs.values())
    cached = statistics.mean(lengths)
    section = "\n".join([
        DECODE_SECTION,
        "",
        f"Run on {datetime.date.today().isoformat()} with `python bench/followup.py --part decode-step` on "
        f"{platform.machine()} ({torch.get_num_threads()} torch threads), model `{Path(model).name}` "
        f"({family}): {args.runs} rounds of one child process per allocator, the allocators taking turns; "
        "each child warms up with one generation of each loop, then measures one of each.",
        "",
        f"- Cache: the {args.minutes}-minute video's artifact (paper-7b preset), {cached:.0f} tokens per "
        f"layer on average ({min(lengths)}-{max(lengths)}).",
        "- Ours: `answer_from_artifact` as the worker runs it: the question prefilled after the artifact, "
        "then greedy decoding into preallocated per-request buffers, evidence timeline on: the attention "
        "functions keep each layer's queries, and one product per layer after the last token measures where "
        "they looked (its time is the last column, once per answer, and its share of the answer's "
        "decoding steps).",
        "- transformers: a fresh copy of the same checkpoint with stock SDPA attention, a `DynamicCache` of "
        f"{round(cached)} tokens in every layer, one `model(input_ids=..., past_key_values=...)` call per "
        "token.",
        f"- {args.tokens} tokens per generation; medians of the {len(runs['jemalloc']['ours'])} steps per "
        "loop and allocator over all rounds; the evidence pass: the median over the rounds.",
        "",
        "| process | ours median ms / token | ours p90 | transformers median ms / token | transformers p90 | "
        "ours / transformers | evidence pass ms / answer |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"The worker's allocator first (target: ours at most 1.15x transformers'). On jemalloc vs on glibc "
        f"malloc: ours {worker / glibc:.2f}x, transformers' loop {stock_worker / stock_glibc:.2f}x.",
        "",
    ])  # fmt: skip
    publish(args, DECODE_SECTION, section)


# ---- memory over repeated indexings ------------------------------------------------------------------------


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from VmRSS


def indexings_part(args, model: str) -> None:
    loaded, config, video = part_setup(args, model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as scratch:
        for index in range(args.indexings):
            store = DiskStore(Path(scratch) / str(index))  # a miss every time: the whole index step
            reset_peak()
            started = time.perf_counter()
            result = get_or_compress(loaded, store, video, config)
            wall = time.perf_counter() - started
            assert not result.hit
            del result, store
            memory = {name: kib / 1024 for name, kib in memory_kib(os.getpid()).items()}
            rows.append((wall, memory["VmHWM"], memory["VmRSS"]))
            print(f"indexing {index + 1}: {wall:.1f} s, peak RSS {memory['VmHWM']:.0f} MiB, after it "
                  f"{memory['VmRSS']:.0f}", flush=True)  # fmt: skip
    # The process's peak so far: reset_peak resets ru_maxrss too, so it is the running max of the peaks.
    so_far = list(itertools.accumulate((peak for _, peak, _ in rows), max))
    first, last = so_far[0], so_far[-1]
    later = [peak for _, peak, _ in rows[len(rows) // 2 :]]
    table = [f"| {i + 1} | {w:.1f} | {s:.0f} | {p:.0f} | {n:.0f} |"
             for i, ((w, p, n), s) in enumerate(zip(rows, so_far, strict=True))]  # fmt: skip
    section = "\n".join([
        INDEXINGS_SECTION,
        "",
        f"Run on {datetime.date.today().isoformat()} with `{' '.join(['python', *sys.argv])}` on "
        f"{platform.machine()} ({torch.get_num_threads()} torch threads), model `{Path(model).name}`, "
        f"{allocator()}: the {args.minutes}-minute video "
        f"indexed {args.indexings} times in one process, each into a fresh store (a miss: decode, vision, "
        "compressed prefill, artifact and vision features written), as a worker does job after job.",
        "",
        "| indexing | wall s | process peak RSS so far MiB | this indexing's peak MiB (VmHWM) | "
        "RSS after it MiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *table,
        "",
        f"Peak RSS after the last indexing is {last / first - 1:+.1%} of the peak after the first (target: "
        f"at most +5%). Per-indexing peaks: first {rows[0][1]:.0f} MiB, median of the second half "
        f"{statistics.median(later):.0f} MiB.",
        "",
    ])  # fmt: skip
    publish(args, INDEXINGS_SECTION, section)


# ---- question-guided asks -------------------------------------------------------------------------------


def question_guided_part(args, model: str) -> None:
    loaded, config, video = part_setup(args, model)
    question = "What happens in this video?"
    figures = {"cached": [], "guided, stored features": [], "guided, full recompute": []}
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as scratch:
        indexed, bare = DiskStore(Path(scratch) / "indexed"), DiskStore(Path(scratch) / "bare")
        index = get_or_compress(loaded, indexed, video, config)
        feature_bytes = indexed.features_nbytes(index.key)
        for run in range(args.runs):
            asked = f"{question} ({run})"
            started = time.perf_counter()
            artifact = get_or_compress(loaded, indexed, video, config).artifact
            answer_from_artifact(loaded, artifact, asked, max_new_tokens=MAX_NEW_TOKENS)
            figures["cached"].append(time.perf_counter() - started)
            for name, store in (("guided, stored features", indexed), ("guided, full recompute", bare)):
                started = time.perf_counter()
                artifact, reused = compress_for_question(loaded, store, video, asked, config)
                answer_from_artifact(loaded, artifact, asked, max_new_tokens=MAX_NEW_TOKENS)
                figures[name].append(time.perf_counter() - started)
                assert reused == (store is indexed)
    median = {name: statistics.median(values) for name, values in figures.items()}
    recompute = median["guided, full recompute"]
    rows = [f"| {name} | {value:.2f} | {recompute / value:.1f}x |" for name, value in median.items()]
    section = "\n".join([
        GUIDED_SECTION,
        "",
        f"Run on {datetime.date.today().isoformat()} with `python bench/followup.py --part question-guided` "
        f"on {platform.machine()} ({torch.get_num_threads()} torch threads), model `{Path(model).name}`: "
        f"the {args.minutes}-minute video indexed once (paper-7b preset), then per question, median of "
        f"{args.runs}: a `cached` ask (load the artifact, answer), a `question_guided` ask from the vision "
        "features the index step stored, and one from a store without them (decode and vision again: "
        f"what every guided ask cost before). {MAX_NEW_TOKENS} new tokens at most.",
        "",
        "| ask | median s | faster than full recompute |",
        "| --- | ---: | ---: |",
        *rows,
        "",
        f"Stored vision features: {feature_bytes / 1e6:.1f} MB for this video (bf16).",
        "",
    ])  # fmt: skip
    publish(args, GUIDED_SECTION, section)


# ---- index wall against its stages -------------------------------------------------------------------------


def overlap_part(args, model: str) -> None:
    loaded, config, video = part_setup(args, model)
    # Decoding as the worker leaves it (threads=0: a single-threaded decoder per core, each on its own
    # span of the video), and in one pass on one thread.
    runs = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="videoqa-bench-") as scratch:
        for run in range(args.runs):
            for threads, results in runs.items():  # interleaved, so drift hits both alike
                store = DiskStore(Path(scratch) / f"{threads}-{run}")  # a miss every time
                decoding = functools.partial(sample_frames, threads=threads)
                with mock.patch("worker.engine.vision.sample_frames", decoding):
                    started = time.perf_counter()
                    result = get_or_compress(loaded, store, video, config)
                    wall = time.perf_counter() - started
                results.append({"wall": wall, **{s: result.seconds.get(s, 0.0) for s in WORK_STAGES},
                                "wait": result.seconds.get("wait", 0.0)})  # fmt: skip
                print(f"decoder threads {threads}, run {run + 1}: {results[-1]}", flush=True)

    def median(threads: int, name: str) -> float:
        return statistics.median(r[name] for r in runs[threads])

    def summed(threads: int) -> float:
        return statistics.median(sum(r[s] for s in WORK_STAGES) for r in runs[threads])

    header = " | ".join(["decoder threads", "index wall s", *WORK_STAGES, "sum of stages s", "hidden s",
                         "tower waiting for frames s"])  # fmt: skip

    def cells(threads: int) -> list[str]:
        wall, work, idle = median(threads, "wall"), summed(threads), median(threads, "wait")
        stages = [f"{median(threads, stage):.1f}" for stage in WORK_STAGES]
        name = "1" if threads else "0 (a decoder per core: the worker)"
        return [name, f"{wall:.1f}", *stages, f"{work:.1f}", f"{work - wall:.1f}", f"{idle:.1f}"]

    rows = ["| " + " | ".join(cells(threads)) + " |" for threads in runs]
    section = "\n".join([
        OVERLAP_SECTION,
        "",
        f"Run on {datetime.date.today().isoformat()} with `python bench/followup.py --part overlap --runs "
        f"{args.runs}` on {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads), model `{Path(model).name}`: the {args.minutes}-minute video indexed {args.runs} times "
        "with each decoder setting (interleaved, a fresh store each: decode, vision, compressed prefill, "
        "artifact written), medians. Decoding and patchifying run in a thread ahead of the vision tower "
        "(`Prefetcher`); the prefill starts after the last slice (the paper's allocation needs every "
        "chunk's frame distance first), so only decode + preprocess and vision can overlap.",
        "",
        f"| {header} |",
        "|" + "---|" * (len(WORK_STAGES) + 5),
        *rows,
        "",
        "- hidden: the sum of the stages minus the wall: work that ran at the same time as other work.",
        "- tower waiting: seconds the vision tower sat idle waiting for decoded frames.",
        f"- 1 decoder thread vs the worker's: index wall {median(1, 'wall') / median(0, 'wall'):.2f}x, "
        f"decode stage {median(1, 'decode') / median(0, 'decode'):.2f}x.",
        "",
    ])  # fmt: skip
    publish(args, OVERLAP_SECTION, section)


PARTS = {
    "answers": answers_part,
    "decode-step": decode_step_part,
    "indexings": indexings_part,
    "question-guided": question_guided_part,
    "overlap": overlap_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=PARTS, default="answers")
    parser.add_argument("--model", help="checkpoint (default: the tiny Qwen2.5-VL built under build/bench)")
    parser.add_argument(
        "--followups", type=int, default=3, help="follow-ups per video; the median is reported"
    )
    parser.add_argument("--tokens", type=int, default=128, help="decode-step: tokens per generation")
    parser.add_argument(
        "--runs", type=int, default=5, help="question-guided, overlap: runs; decode-step: rounds of children"
    )
    parser.add_argument("--indexings", type=int, default=20, help="indexings: how many")
    parser.add_argument("--minutes", type=int, default=10, help="the parts' video length")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # decode-step's measuring run
    parser.add_argument("--store", help=argparse.SUPPRESS)  # decode-step: the children's artifact store
    args = parser.parse_args()
    model = args.model or str(make_tiny(ROOT / "build" / "bench" / "tiny")["qwen2_5_vl"])
    PARTS[args.part](args, model)


if __name__ == "__main__":
    main()
