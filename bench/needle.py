"""Benchmark: needle QA, grounding and binding with the trained needle checkpoints, for every compression
method.

A needle video (`worker.needle.videos`, held-out backgrounds) shows one shape for 1-2 seconds at a chosen
depth and no other shape, as in the paper's needle QA; the question is the needle's colour ("What colour
was the square?"). Among 0-3 other shapes the tiny models often name another shape's colour even
uncompressed; `training.json` records both accuracies. The videos are twice as long as any seen in
training. For each of 10 depths x N videos, every method answers at video budgets of 5, 10, 20 and 40% of
the uncompressed video tokens:

- uncompressed (every token; the engine's r = 1 path, equal to a plain prefill);
- question-guided adakv + paper temporal: the question is the guide prompt (the paper's setting);
- cached adakv + paper temporal: the checkpoint's generic guide prompt (our default: compressed once);
- question-guided adakv + reference temporal, even + paper, pyramid + paper;
- random eviction after a full prefill, as many tokens per layer as question-guided adakv + paper keeps;
- uniform frame subsampling to the same number of tokens.

Grounding: for each answer, whether the evidence timeline's top moment lies within 1 second of the
needle's visible interval, before and after the evidence was calibrated: "before" is the timeline answers
had (the question's and the answer's attention, every head, summed over each frame's tokens:
`evidence.LEGACY`); "after" is the question's prefill, per frame its most attended token, over the heads
the checkpoint's `videoqa.json` names (`videoqa calibrate-evidence`), and "uncalibrated" the same over every
head (what a checkpoint without a calibration gets).

Focused (`worker.engine.focus`, default settings): the cached default's answer re-read around its top
moments, at 5 and 10%; and the compute per answer (CPU seconds of this process, one torch thread) of a
focused answer against a question-guided one (compression from the stored vision features, then the
answer), both on the same videos in the same process.

Binding (bench/binding.py): a shape among 1-3 others, asked every binding question type, uncompressed,
question-guided and cached with three guide prompts, at 5, 10 and 20%: what compressing once costs where
the guide does not name the answer. Its section also holds the checkpoints' held-out accuracy.

Run: python bench/needle.py [--videos-per-depth 20] [--binding-videos 60] [--families qwen2_5_vl qwen2_vl]
                            [--task both] [--processes 2]
     python bench/needle.py --smoke --task needle    # 2 needle videos, nothing written: the whole path
     python bench/needle.py --smoke --task binding   # 1 binding video, nothing written
"""

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import binding
import torch
from baselines import KEEP_ALL, evict_randomly, kept_video_tokens, subsampled
from common import ROOT, write_section
from proportions import paired_difference, pct, signed, wilson

from worker.engine.adaretake import CompressionConfig
from worker.engine.checkpoint_settings import read_checkpoint_settings, with_settings
from worker.engine.engine import Question, answer_from_artifact, compress_video, prefill_question
from worker.engine.evidence import LEGACY, EvidenceConfig, evidence_timeline, top_moments
from worker.engine.focus import FocusConfig, answer_focused
from worker.engine.models import LoadedModel, load_model
from worker.engine.prompt import build_prompt
from worker.engine.vision import encode_video
from worker.needle.calibrate import GROUNDING_SECONDS, grounded
from worker.needle.train import RECORD_FILE, TrainConfig
from worker.needle.videos import answer_matches, colour_question, random_spec, write_video
from worker.tools.plan import Workload, plan, text_parameters
from worker.tools.shapes import SHAPES

SECTION = "## Needle QA and grounding, trained checkpoints (bench/needle.py)"
BINDING_SECTION = "## Binding colour to shape, trained checkpoints (bench/needle.py)"
PLOT = ROOT / "docs" / "needle.png"
CHECKPOINTS = ROOT / "models" / "needle"
FAMILIES = ("qwen2_5_vl", "qwen2_vl")
DEPTHS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
BUDGET_SHARES = (0.05, 0.10, 0.20, 0.40)
SECONDS = 2 * TrainConfig().max_seconds  # twice the longest training video
CHUNK_FRAMES = 16  # 8-second chunks: five per video, so the temporal allocation has chunks to weigh
ANSWER_TOKENS = 4
FOCUS_SHARES = (0.05, 0.10)
SEED = 7  # eval videos: random_spec(SEED * 1000 + ..., split="eval"), disjoint from training by split
BINDING_JOB_VIDEOS = 5  # binding videos per pooled job

UNCOMPRESSED = "uncompressed"
QG = "question-guided adakv + paper"
CACHED = "cached adakv + paper (default)"
# (label, layer allocation, temporal allocation, question-guided) of the engine's methods.
ENGINE_METHODS = (
    (QG, "adakv", "paper", True),
    (CACHED, "adakv", "paper", False),
    ("question-guided adakv + reference", "adakv", "reference", True),
    ("question-guided even + paper", "even", "paper", True),
    ("question-guided pyramid + paper", "pyramid", "paper", True),
)
RANDOM = "random eviction"
SUBSAMPLE = "uniform frame subsampling"
FOCUSED = "focused (cached default, re-read)"
METHODS = (*(label for label, *_ in ENGINE_METHODS), RANDOM, SUBSAMPLE, FOCUSED)
# Grounding of an answer: before calibration, after, and after without a calibration (every head).
BEFORE, AFTER, UNCALIBRATED = "grounded", "grounded_after", "grounded_uncalibrated"


@dataclasses.dataclass
class Outcome:
    right: bool
    grounded: bool  # before: the timeline answers had
    kept: float
    grounded_after: bool = False
    grounded_uncalibrated: bool = False
    cpu_seconds: float = 0.0  # focused, question-guided and cached at FOCUS_SHARES: the answer's compute


def question_grounding(loaded: LoadedModel, artifact, question: str, needle) -> tuple[bool, bool]:
    """Whether the question's prefill puts the top moment on the needle: over the checkpoint's evidence
    heads, and over every head."""
    prompt = build_prompt(loaded.tokenizer, question)
    prefill = prefill_question(loaded, Question(artifact, prompt, max_new_tokens=0))
    mass = prefill.evidence.video_mass()
    return tuple(
        grounded(top_moments(evidence_timeline(artifact, mass, prefill.text0, config), 1)[0][0], needle)
        for config in (dataclasses.replace(loaded.evidence, source="question"), EvidenceConfig())
    )


def one_video(loaded: LoadedModel, base: CompressionConfig, path: Path, spec) -> dict:
    """Every method's outcome on one video: {(method, share): Outcome}, and (UNCOMPRESSED, 1.0)."""
    qa = colour_question(spec)
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)

    def judge(artifact) -> Outcome:
        answer = answer_from_artifact(
            loaded, artifact, qa.question, max_new_tokens=ANSWER_TOKENS, evidence=LEGACY
        )
        right = answer_matches(answer.text, qa.answer)
        before = grounded(answer.top_moments[0][0], spec.target)
        after, uncalibrated = question_grounding(loaded, artifact, qa.question, spec.target)
        return Outcome(right, before, kept_video_tokens(artifact, text0), after, uncalibrated)

    def ask(artifact, tokens: int):
        return answer_from_artifact(loaded, artifact, qa.question, max_new_tokens=tokens)

    features = encode_video(loaded, path, base.sampling)  # decoded and encoded once for every method
    full = compress_video(loaded, path, dataclasses.replace(base, budget=KEEP_ALL), features=features)
    report = full.metadata["report"]
    num_video, grid_t = report["video_tokens_before"], report["grid_thw"][0]
    outcomes = {(UNCOMPRESSED, 1.0): judge(full)}
    for share in BUDGET_SHARES:
        video_budget = round(share * num_video)
        for label, layer_allocation, temporal_allocation, guided in ENGINE_METHODS:
            config = dataclasses.replace(
                base,
                budget=text0 + video_budget,
                layer_allocation=layer_allocation,
                temporal_allocation=temporal_allocation,
            )
            guide = qa.question if guided else None
            started = time.process_time()
            artifact = compress_video(loaded, path, config, guide_question=guide, features=features)
            compressed = time.process_time() - started
            outcomes[label, share] = judge(artifact)
            if label == QG:
                counts = [n - text0 for n in artifact.lengths]
                if share in FOCUS_SHARES:  # its compute per answer: the compression and a plain answer
                    started = time.process_time()
                    ask(artifact, ANSWER_TOKENS)
                    outcomes[label, share].cpu_seconds = compressed + time.process_time() - started
            if label == CACHED and share in FOCUS_SHARES:
                started = time.process_time()  # a plain answer from the cache: part of both others
                ask(artifact, ANSWER_TOKENS)
                outcomes[label, share].cpu_seconds = time.process_time() - started
                started = time.process_time()
                focused = answer_focused(loaded, artifact, path, ask, config=FocusConfig(),
                                         sampling=base.sampling, max_new_tokens=ANSWER_TOKENS)  # fmt: skip
                cpu = time.process_time() - started
                right = answer_matches(focused.text, qa.answer)
                on_needle = grounded(focused.top_moments[0][0], spec.target)  # both passes' evidence
                kept = kept_video_tokens(artifact, text0)
                outcomes[FOCUSED, share] = Outcome(right, on_needle, kept, on_needle, on_needle, cpu)
        generator = torch.Generator().manual_seed(hash((spec.target.start, share)) % (1 << 31))
        outcomes[RANDOM, share] = judge(evict_randomly(full, text0, counts, generator))
        outcomes[SUBSAMPLE, share] = judge(subsampled(loaded, path, base, video_budget, num_video // grid_t))
    return outcomes


def base_config(folder: Path) -> CompressionConfig:
    """The checkpoint's own settings (videoqa.json), with this benchmark's chunk size."""
    return with_settings(CompressionConfig(chunk_frames=CHUNK_FRAMES), read_checkpoint_settings(folder))


def run_depth(job: tuple[Path, int, int]) -> list[tuple[float, dict]]:
    """(depth, outcomes) for `videos` videos with the needle at DEPTHS[depth_index], in this process."""
    folder, depth_index, videos = job
    torch.set_num_threads(1)
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    base, depth, rows = base_config(folder), DEPTHS[depth_index], []
    with tempfile.TemporaryDirectory(prefix="videoqa-needle-") as workdir:
        for index in range(videos):
            seed = SEED * 1000 + depth_index * 100 + index
            spec = random_spec(seed, SECONDS, "eval", depth=depth, distractors=0)
            path = write_video(spec, Path(workdir) / "needle.mp4")
            rows.append((depth, one_video(loaded, base, path, spec)))
    right = sum(outcomes[QG, 0.1].right for _, outcomes in rows)
    print(f"{folder.name} depth {depth:.2f}: question-guided 10% right on {right}/{videos}", flush=True)
    return rows


def pooled(worker, jobs: list, processes: int) -> list:
    """`worker` over `jobs` in a pool of processes (videos are independent; one torch thread each)."""
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            return pool.map(worker, jobs, chunksize=1)
    return [worker(job) for job in jobs]


def run(folders: dict[str, Path], videos_per_depth: int, depth_indices: range, binding_videos: int,
        processes: int) -> dict:  # fmt: skip
    """Every (model, depth) needle job, then every model's binding videos in jobs of BINDING_JOB_VIDEOS:
    per family {"rows": [(depth, outcomes)], "binding": [outcomes], "base", "folder"}."""
    results = {family: {"rows": [], "binding": [], "base": base_config(folder), "folder": folder}
               for family, folder in folders.items()}  # fmt: skip
    names = {folder: family for family, folder in folders.items()}
    needle_jobs = [(folder, d, videos_per_depth) for folder in folders.values() for d in depth_indices]
    for (folder, _, _), rows in zip(needle_jobs, pooled(run_depth, needle_jobs, processes), strict=True):
        results[names[folder]]["rows"] += rows
    binding_jobs = [
        (folder, base_config(folder), SECONDS, range(start, min(start + BINDING_JOB_VIDEOS, binding_videos)))
        for folder in folders.values()
        for start in range(0, binding_videos, BINDING_JOB_VIDEOS)
    ]
    done = pooled(binding.run_videos, binding_jobs, processes)
    for (folder, *_), rows in zip(binding_jobs, done, strict=True):
        results[names[folder]]["binding"] += rows
    return results


# ---- statistics -----------------------------------------------------------------------------------


def cells(result: dict, key: str) -> dict:
    """{(method, share): list of bools} for `key` ("right" or "grounded")."""
    table: dict = {}
    for _, outcomes in result["rows"]:
        for cell, outcome in outcomes.items():
            table.setdefault(cell, []).append(getattr(outcome, key))
    return table


# ---- the report -----------------------------------------------------------------------------------


def accuracy_table(result: dict, key: str) -> list[str]:
    table = cells(result, key)
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in BUDGET_SHARES) + " |",
             "|---|" + "---:|" * len(BUDGET_SHARES)]  # fmt: skip
    full = pct(table[UNCOMPRESSED, 1.0])
    lines.append(f"| {UNCOMPRESSED} (every token) | " + " | ".join([full] * len(BUDGET_SHARES)) + " |")
    for method in METHODS:
        row = [pct(table[method, s]) if (method, s) in table else "-" for s in BUDGET_SHARES]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def markdown_row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_head(*names) -> list[str]:
    """A table's header and alignment rows: the first column left, the others right."""
    return [markdown_row(*names), "|---|" + "---:|" * (len(names) - 1)]


def grounding_summary(results: dict) -> list[str]:
    """The cached default and uncompressed, before and after, and cached minus uncompressed after."""
    lines = markdown_head("model", "budget", "uncompressed before", "cached before", "uncompressed after",
                          "cached after", "cached after - uncompressed after [95% CI]")  # fmt: skip
    for family, result in results.items():
        before, after = cells(result, BEFORE), cells(result, AFTER)
        for share in BUDGET_SHARES:
            diff, half = paired_difference(after[CACHED, share], after[UNCOMPRESSED, 1.0])
            lines.append(markdown_row(
                family, f"{share:.0%}", pct(before[UNCOMPRESSED, 1.0]), pct(before[CACHED, share]),
                pct(after[UNCOMPRESSED, 1.0]), pct(after[CACHED, share]), signed(diff, half),
            ))  # fmt: skip
    return lines


def focus_table(results: dict) -> list[str]:
    """Focused against uncompressed, question-guided and cached, and focused minus uncompressed, paired."""
    lines = markdown_head("model", "budget", "uncompressed", "question-guided", "cached", "focused",
                          "focused - uncompressed [95% CI]")  # fmt: skip
    for family, result in results.items():
        table = cells(result, "right")
        for share in FOCUS_SHARES:
            diff, half = paired_difference(table[FOCUSED, share], table[UNCOMPRESSED, 1.0])
            lines.append(markdown_row(
                family, f"{share:.0%}", pct(table[UNCOMPRESSED, 1.0]), pct(table[QG, share]),
                pct(table[CACHED, share]), pct(table[FOCUSED, share]), signed(diff, half),
            ))  # fmt: skip
    return lines


def compute_table(results: dict) -> list[str]:
    """CPU seconds per answer of focused and question-guided, on the same videos in the same processes, and
    of a plain answer from the cache: question-guided holds one such answer, focused two (its floor), so
    what each adds to one is compared too."""
    lines = markdown_head("model", "budget", "cached answer ms (median)", "question-guided ms (median)",
                          "focused ms (median)", "focused / question-guided (means)",
                          "floor: 2 answers / question-guided",
                          "added to an answer: focused / question-guided")  # fmt: skip
    for family, result in results.items():
        seconds = cells(result, "cpu_seconds")
        for share in FOCUS_SHARES:
            plain, guided, focused = (sum(seconds[label, share]) for label in (CACHED, QG, FOCUSED))
            labels = (CACHED, QG, FOCUSED)
            medians = [f"{1000 * statistics.median(seconds[label, share]):.1f}" for label in labels]
            lines.append(markdown_row(
                family, f"{share:.0%}", *medians, f"{focused / guided:.2f}", f"{2 * plain / guided:.2f}",
                f"{(focused - plain) / (guided - plain):.2f}",
            ))  # fmt: skip
    return lines


def flop_model_line() -> str:
    """Focused against question-guided at a real model's scale, by `videoqa plan`'s FLOP model: what each
    adds to a cached answer (question-guided: the compressed prefill from stored features; focused: the
    windows' vision and their prefill over the cached video)."""
    shape, work, focus = SHAPES["7b"], Workload(duration=600.0), FocusConfig()
    video = plan(shape, work)
    sampling = dataclasses.replace(work.sampling, fps=focus.fps)
    clip = plan(shape, Workload(duration=focus.window * focus.moments, sampling=sampling))
    layer_params, _ = text_parameters(shape.text)
    hidden, layers, tokens = shape.text["hidden_size"], shape.num_layers, clip.video_tokens
    prefill = 2 * layer_params * tokens * layers + 4 * tokens * (video.kept_tokens + tokens) * hidden * layers
    focused, guided = clip.flops["vision"] + prefill, video.flops["prefill"]
    return (f"By `videoqa plan`'s FLOP model, {shape.model_id} on 10 min of 720p at the defaults: "
            f"question-guided adds {guided / 1e12:.0f} TFLOP (the compressed prefill of {video.video_tokens} "
            f"video tokens), focused {focused / 1e12:.1f} TFLOP ({clip.frames} frames, {tokens} tokens "
            f"re-read): {focused / guided:.3f}x.")  # fmt: skip


def cost_table(results: dict) -> list[str]:
    lines = ["| model | budget | question-guided | cached (generic guide) | cached - guided [95% CI] |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for family, result in results.items():
        table = cells(result, "right")
        for share in BUDGET_SHARES:
            diff, half = paired_difference(table[CACHED, share], table[QG, share])
            guided, cached = pct(table[QG, share]), pct(table[CACHED, share])
            lines.append(f"| {family} | {share:.0%} | {guided} | {cached} | {signed(diff, half)} |")
    return lines


def comparisons(results: dict) -> list[str]:
    lines = []
    for family, result in results.items():
        table = cells(result, "right")
        for other in (RANDOM, SUBSAMPLE):
            diff, half = paired_difference(table[QG, 0.1], table[other, 0.1])
            verdict = "outside noise" if diff - half > 0 else "NOT outside noise"
            lines.append(f"- {family}, 10% budget: question-guided adakv + paper minus {other}: {diff:+.0%} "
                         f"(95% CI {diff - half:+.0%} to {diff + half:+.0%}, paired over "
                         f"{len(table[QG, 0.1])} videos): {verdict}.")  # fmt: skip
    return lines


def depth_accuracy(result: dict, depth: float, method: str, share: float) -> float:
    rows = [outcomes[method, share].right for d, outcomes in result["rows"] if d == depth]
    return sum(rows) / len(rows)


def depth_table(result: dict) -> list[str]:
    lines = ["| depth | " + " | ".join(f"{s:.0%}" for s in BUDGET_SHARES) + " | uncompressed |",
             "|---:|" + "---:|" * (len(BUDGET_SHARES) + 1)]  # fmt: skip
    for depth in sorted({d for d, _ in result["rows"]}):
        shares = [depth_accuracy(result, depth, CACHED, s) for s in BUDGET_SHARES]
        full = depth_accuracy(result, depth, UNCOMPRESSED, 1.0)
        lines.append(f"| {depth:.2f} | " + " | ".join(f"{v:.0%}" for v in shares) + f" | {full:.0%} |")
    return lines


def training_table(results: dict) -> list[str]:
    """What each checkpoint's training.json recorded: the run and its held-out accuracy."""
    lines = ["| model | command | steps x videos | CPU run | final loss | held-out colour accuracy, "
             "uncompressed | weights sha256 |", "|---|---|---:|---:|---:|---|---|"]  # fmt: skip
    for family, result in results.items():
        record = json.loads((result["folder"] / RECORD_FILE).read_text())
        config = record["config"]
        accuracy = ", ".join(f"{length}: {value:.0%}" for length, value in record["colour_accuracy"].items())
        steps = (f"{config['stills']} x {config['stills_per_step']} stills + "
                 f"{config['steps'] - config['stills']} x {config['videos_per_step']}")  # fmt: skip
        lines.append(
            f"| {family} | `{record['command']}` | {steps} | "
            f"{record['seconds'] / 60:.0f} min | {record['final_loss']:.3f} | {accuracy} "
            f"({record['eval_videos']} videos each) | `{record['weights_sha256'][:16]}` |"
        )
    return lines


def held_out_table(results: dict) -> list[str]:
    """The held-out colour accuracy each checkpoint's training.json recorded, uncompressed, by task and
    length, with 95% Wilson intervals."""
    lengths = [f"{f}x ({f * TrainConfig().max_seconds:g} s)" for f in (1, 2, 4)]
    lines = ["| model | task | " + " | ".join(lengths) + " |", "|---|---|---:|---:|---:|"]
    for family, result in results.items():
        record = json.loads((result["folder"] / RECORD_FILE).read_text())
        n, by_task = record["eval_videos"], {}
        for key, value in record["colour_accuracy"].items():
            length, task = key.split(", ")
            by_task.setdefault(task, []).append(round(value * n))
        for task, rights in by_task.items():
            cells = [f"{r / n:.0%} [{wilson(r, n)[0]:.0%}, {wilson(r, n)[1]:.0%}]" for r in rights]
            lines.append(f"| {family} | {task} | " + " | ".join(cells) + " |")
    return lines


def loaded_heads(result: dict) -> list:
    return read_checkpoint_settings(result["folder"]).get("evidence", {}).get("heads", [])


def run_line(seconds: float) -> str:
    command = " ".join(["python bench/needle.py", *sys.argv[1:]])
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, fp32; load average 1/5/15 min at the end: {load}"
    return (
        f"Run on {datetime.date.today().isoformat()} with `{command}` in {seconds / 60:.0f} min ({machine})."
    )


def binding_section(results: dict, seconds: float) -> str:
    any_result = next(iter(results.values()))
    base: CompressionConfig = any_result["base"]
    parts = [
        BINDING_SECTION,
        "",
        run_line(seconds),
        "",
        "### Held-out colour accuracy, uncompressed",
        "",
        '"What colour was the <shape>?" on held-out footage, the shape alone (needle) or among 1-3 other '
        "shapes of distinct kinds and colours at other times (binding); recorded in each checkpoint's "
        f"`training.json` by `videoqa train-needle` (commands in the table below). Training lengths "
        f"{TrainConfig().min_seconds:g}-{TrainConfig().max_seconds:g} s.",
        "",
        *held_out_table(results),
        "",
        "### The cost of compressing once, per question type",
        "",
        f"- Videos: {len(any_result['binding'])} held-out binding videos per model, {SECONDS:g} s (twice the "
        "longest training video), 2-4 shapes of distinct kinds and colours at distinct times; every video is "
        "asked one question of each type: colour (of a named shape), shape (which one had a colour), count, "
        "order (which of two came first), when (in which quarter).",
        f"- Sampling {base.sampling.fps:g} fps, {base.sampling.long_side} px, chunks of {base.chunk_frames} "
        "frames, adakv + paper temporal allocation; budgets are shares of the uncompressed video tokens. "
        "Question-guided compresses for each question; cached compresses once per video and guide, then "
        "answers all five questions from that cache. Guides: "
        + "; ".join(f"{label}: {prompt!r}" for label, prompt in binding.guides(any_result["folder"]).items())
        + ".",
        "- Cells: accuracy (first words of the answer) with its 95% Wilson interval; differences are paired "
        "over the same questions (95% normal interval), **bold** where a cached guide loses more than "
        f"{binding.LOSS_TO_EXPLAIN:.0%}.",
        "",
    ]
    for family, result in results.items():
        folder, rows = result["folder"], result["binding"]
        parts += [f"### {family}: binding accuracy", "", *binding.accuracy_table(rows, folder), ""]
        parts += [f"### {family}: cached minus question-guided", "", *binding.cost_table(rows, folder), ""]
        parts += [f"### {family}: focused (the task guide's cache, re-read) against uncompressed", "",
                  *binding.focus_table(rows), ""]  # fmt: skip
        share = binding.BUDGET_SHARES[0]
        parts += [f"### {family}: where the budget went at {share:.0%}", "",
                  "Per layer, the share of the video tokens kept in the temporal grids where the shapes the "
                  "question names are on screen (all shapes for count), mean over the videos; the last "
                  "column counts the answers right where no layer kept the budget's share of those grids.",
                  "",
                  *binding.evidence_table(rows, folder, share), ""]  # fmt: skip
    return "\n".join(parts)


def section(results: dict, videos_per_depth: int, seconds: float) -> str:
    any_result = next(iter(results.values()))
    base: CompressionConfig = any_result["base"]
    n = len(any_result["rows"])
    parts = [
        SECTION,
        "",
        run_line(seconds),
        "",
        f"- Models: the trained checkpoints in `models/needle/` (see `training.json` beside each). Videos: "
        f"{SECONDS:g} s (twice the longest training video), held-out backgrounds, needle at {len(DEPTHS)} "
        f"depths x {videos_per_depth} videos = {n} videos per cell; no other shape in the video.",
        f"- Sampling {base.sampling.fps:g} fps, {base.sampling.long_side} px, chunks of {base.chunk_frames} "
        f"frames; budgets are shares of the uncompressed video tokens, text0 on top. Guide prompt of the "
        f"cached mode: {base.guide_prompt!r}.",
        "- Cells: accuracy of the colour answer (first word), with its 95% Wilson interval. Differences "
        "between methods are paired over the same videos (95% normal interval).",
        "",
    ]
    parts += ["### The checkpoints", "", *training_table(results), "",
              f"Training lengths {TrainConfig().min_seconds:g}-{TrainConfig().max_seconds:g} s; the loss "
              "curves are the bottom row of the plot.", ""]  # fmt: skip
    for family, result in results.items():
        parts += [f"### {family}: needle accuracy", "", *accuracy_table(result, "right"), ""]
    parts += ["### Against the baselines at 10%", "", *comparisons(results), ""]
    parts += ["### The cost of compressing once (cached generic guide vs question-guided)", "",
              *cost_table(results), ""]  # fmt: skip
    heads = "; ".join(f"{family} {len(loaded_heads(result))} heads" for family, result in results.items())
    parts += [
        f"### Grounding before and after: the top moment within {GROUNDING_SECONDS:g} s of the needle",
        "",
        "Before: the question's and the answer's attention, every head, summed over each frame's tokens (the "
        "timeline answers had). After: the question's prefill only, per frame its most attended token, over "
        f"the heads `videoqa calibrate-evidence` chose for the checkpoint (its `videoqa.json`: {heads}). "
        "Uncalibrated: the same over every head. Focused: both passes' timelines averaged.",
        "",
        *grounding_summary(results),
        "",
    ]
    for family, result in results.items():
        for key, name in ((BEFORE, "before"), (AFTER, "after"), (UNCALIBRATED, "after, uncalibrated")):
            title = f"### {family}: grounding {name}"
            parts += [title, "", *accuracy_table(result, key), ""]
    focus = FocusConfig()
    parts += [
        "### Focused answers (re-read around the top moments)",
        "",
        f"Defaults: {focus.moments} moments, {focus.window:g} s windows at {focus.fps:g} fps, the "
        "compression's frame size; from the cached default's cache.",
        "",
        *focus_table(results),
        "",
        "Compute per answer, CPU seconds of the process (one torch thread): question-guided is the "
        "compression from the stored vision features and the answer; focused is both passes and the windows' "
        "decoding, vision and prefill; a cached answer is one plain answer from the cached default's "
        "cache. Question-guided holds one answer and focused two, so at this model size, where an answer "
        "costs about as much as a compression from stored features, 2 answers / question-guided is the "
        "floor of the ratio; the last column compares what each adds to one answer (the FLOP model below "
        "estimates the same at 7B).",
        "",
        *compute_table(results),
        "",
        flop_model_line(),
        "",
    ]
    for family, result in results.items():
        parts += [f"### {family}: cached default, accuracy by needle depth x budget", "",
                  *depth_table(result), ""]  # fmt: skip
    parts += ["![needle accuracy](needle.png)", ""]
    return "\n".join(parts)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(results), figsize=(6 * len(results), 16), squeeze=False)
    for column, (family, result) in enumerate(results.items()):
        table = cells(result, "right")
        ax = axes[0][column]
        for method in METHODS:
            values = [sum(table[method, s]) / len(table[method, s]) for s in BUDGET_SHARES]
            ax.plot([100 * s for s in BUDGET_SHARES], values, marker="o", label=method)
        full = table[UNCOMPRESSED, 1.0]
        ax.axhline(sum(full) / len(full), color="black", linestyle="--", label=UNCOMPRESSED)
        ax.set(title=f"{family}: needle colour accuracy", xlabel="video budget (% of tokens)",
               ylabel="accuracy", xscale="log", ylim=(0, 1.02))  # fmt: skip
        ax.set_xticks([100 * s for s in BUDGET_SHARES], [f"{s:.0%}" for s in BUDGET_SHARES])
        ax.legend(fontsize=7)
        depths = sorted({d for d, _ in result["rows"]})
        grid = [[depth_accuracy(result, d, CACHED, s) for s in BUDGET_SHARES] for d in depths]
        heat = axes[1][column]
        image = heat.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        heat.set(title=f"{family}: cached default by depth", xlabel="budget", ylabel="needle depth")
        heat.set_xticks(range(len(BUDGET_SHARES)), [f"{s:.0%}" for s in BUDGET_SHARES])
        heat.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        fig.colorbar(image, ax=heat)
        record = json.loads((result["folder"] / RECORD_FILE).read_text())
        curve = axes[2][column]
        curve.plot([25 * i for i in range(len(record["losses_every_25"]))], record["losses_every_25"])
        curve.set(title=f"{family}: training loss (answers + token targets)", xlabel="step",
                  ylabel="cross-entropy", yscale="log")  # fmt: skip
        binding.plot_accuracy(axes[3][column], family, result["binding"], result["folder"])
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--task", choices=("needle", "binding", "both"), default="both",
                        help="which sections to run and write; the plot only with both")  # fmt: skip
    parser.add_argument("--videos-per-depth", type=int, default=20)
    parser.add_argument("--binding-videos", type=int, default=60, help="binding videos per model")
    parser.add_argument("--processes", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="folder of FAMILY checkpoints")
    parser.add_argument("--smoke", action="store_true", help="a video or two of one family; writes nothing")
    args = parser.parse_args()
    needle, binding_task = args.task in ("needle", "both"), args.task in ("binding", "both")
    if args.smoke:
        family = args.families[0]
        depths = range(0, len(DEPTHS), 9) if needle else range(0)
        result = run({family: args.checkpoints / family}, 1, depths, int(binding_task), 1)[family]
        if needle:
            print("\n".join(accuracy_table(result, "right")))
        if binding_task:
            print("\n".join(binding.accuracy_table(result["binding"], result["folder"])))
        return
    if args.task == "both":
        import matplotlib  # noqa: F401  (fail before the run, not after it: the plot needs it)
    started = time.perf_counter()
    folders = {family: args.checkpoints / family for family in args.families}
    depths = range(len(DEPTHS)) if needle else range(0)
    results = run(
        folders, args.videos_per_depth, depths, args.binding_videos if binding_task else 0, args.processes
    )
    seconds = time.perf_counter() - started
    if needle:
        write_section(SECTION, section(results, args.videos_per_depth, seconds))
    if binding_task:
        write_section(BINDING_SECTION, binding_section(results, seconds))
    if args.task == "both":
        plot(results)


if __name__ == "__main__":
    main()
