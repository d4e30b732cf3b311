"""The binding task of bench/needle.py: what compressing once costs, per question type and guide prompt.

A binding video (`binding_spec`, held-out footage) shows 2-4 shapes of distinct kinds and colours at
distinct times. Each is asked one question of every binding type (`BINDING_KINDS`: the colour of a named
shape, which shape had a colour, how many shapes, which of two came first, in which quarter one appeared),
and each question is answered

- uncompressed (every token);
- question-guided: compressed for that question, the question as the guide prompt (the paper's setting);
- cached with each guide of `guides()`: compressed once per video with that guide, every question answered
  from the one cache (the product's mode);
- focused (`worker.engine.focus`, default settings), at FOCUS_SHARES: the task guide's cache, re-read around
  each question's top evidence moments;

at every share of BUDGET_SHARES of the uncompressed video tokens, adakv + paper temporal allocation.

Beside each answer the bench records where the budget went: per layer, the share of the tokens kept in
the temporal grids (2 frames) where the shapes the question names are on screen (every shape for "how
many"), which against the share kept overall says whether a guide steered the budget to the evidence.
"""

import dataclasses
import random
import tempfile
from pathlib import Path

import torch
from baselines import KEEP_ALL
from proportions import paired_difference, pct, signed

from worker.engine.adaretake import DEFAULT_GUIDE_PROMPT, CompressionConfig
from worker.engine.artifact import CompressedKV
from worker.engine.checkpoint_settings import read_checkpoint_settings
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.focus import FocusConfig, answer_focused
from worker.engine.models import LoadedModel, load_model
from worker.engine.prompt import build_prompt
from worker.engine.vision import encode_video
from worker.needle.videos import (
    BINDING_KINDS,
    QA,
    VideoSpec,
    answer_matches,
    binding_spec,
    questions,
    write_video,
)

BUDGET_SHARES = (0.05, 0.10, 0.20)
FOCUS_SHARES = (0.05, 0.10)
SEED = 11  # eval videos: binding_spec(SEED * 1000 + index, split="eval"), disjoint from training by split
ANSWER_TOKENS = 4
LOSS_TO_EXPLAIN = 0.05  # a cached guide losing more than this against question-guided is looked into
UNCOMPRESSED = "uncompressed"
QUESTION_GUIDED = "question-guided"
FOCUSED = "focused (task guide's cache, re-read)"
TASK_GUIDE = "cached, task guide"
MINIMAL_GUIDE = "Describe the video."


def guides(folder: Path) -> dict[str, str]:
    """The cached modes' guide prompts: the checkpoint's own task, the product's default, a minimal one."""
    return {
        TASK_GUIDE: read_checkpoint_settings(folder)["guide_prompt"],
        "cached, product default guide": DEFAULT_GUIDE_PROMPT,
        "cached, minimal guide": MINIMAL_GUIDE,
    }


@dataclasses.dataclass
class Outcome:
    """One answer: right or not, and per layer the share of the asked shapes' tokens kept."""

    right: bool
    kept_asked: list[float]


def asked_events(spec: VideoSpec, qa: QA) -> list:
    """The events a question names by shape or colour; every event when it names none ("how many")."""
    words = set(qa.question.rstrip("?").split())
    named = [e for e in spec.events if e.shape in words or e.colour in words]
    return named or list(spec.events)


def asked_grids(spec: VideoSpec, qa: QA, timestamps: list[float], frames_per_grid: int) -> set[int]:
    """Temporal grids holding a sampled frame in which a shape the question names is on screen."""
    events = asked_events(spec, qa)
    return {i // frames_per_grid for i, t in enumerate(timestamps) if any(e.visible(t) for e in events)}


def kept_share(
    artifact: CompressedKV, grids: set[int], tokens_per_grid: int, frames_per_grid: int
) -> list[float]:
    """Per layer, the share of the video tokens of `grids` that the cache kept."""
    wanted = torch.tensor(sorted(grids)) * frames_per_grid  # [grids]: first frame of each grid
    total = len(grids) * tokens_per_grid
    return [torch.isin(frames, wanted).sum().item() / total for frames in artifact.token_frames]


def one_video(
    loaded: LoadedModel, base: CompressionConfig, path: Path, spec: VideoSpec, prompts: dict, seed: int
) -> dict:
    """{(method, share, kind): Outcome} for every binding question of one video ((UNCOMPRESSED, 1.0, kind)
    for the full cache); `seed` draws the pair of the "which came first" question."""
    qas = [qa for qa in questions(spec, random.Random(seed)) if qa.kind in BINDING_KINDS]
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    features = encode_video(loaded, path, base.sampling)  # decoded and encoded once for every method
    frames_per_grid = loaded.vision.temporal_patch_size
    tokens_per_grid = features.layout.tokens_per_grid
    grids = {qa.kind: asked_grids(spec, qa, features.timestamps, frames_per_grid) for qa in qas}

    def judge(artifact: CompressedKV, qa: QA) -> Outcome:
        answer = answer_from_artifact(loaded, artifact, qa.question, max_new_tokens=ANSWER_TOKENS)
        kept = kept_share(artifact, grids[qa.kind], tokens_per_grid, frames_per_grid)
        return Outcome(answer_matches(answer.text, qa.answer), kept)

    full = compress_video(loaded, path, dataclasses.replace(base, budget=KEEP_ALL), features=features)
    outcomes = {(UNCOMPRESSED, 1.0, qa.kind): judge(full, qa) for qa in qas}
    for share in BUDGET_SHARES:
        config = dataclasses.replace(base, budget=text0 + round(share * features.layout.num_tokens))
        for qa in qas:
            guided = compress_video(loaded, path, config, guide_question=qa.question, features=features)
            outcomes[QUESTION_GUIDED, share, qa.kind] = judge(guided, qa)
        for label, guide in prompts.items():
            cached = compress_video(
                loaded, path, dataclasses.replace(config, guide_prompt=guide), features=features
            )
            outcomes.update({(label, share, qa.kind): judge(cached, qa) for qa in qas})
            if label == TASK_GUIDE and share in FOCUS_SHARES:
                for qa in qas:  # what the cache kept of the asked shapes is the task guide's
                    right = focused_right(loaded, cached, path, qa, base)
                    outcomes[FOCUSED, share, qa.kind] = Outcome(
                        right, outcomes[label, share, qa.kind].kept_asked
                    )
    return outcomes


def focused_right(
    loaded: LoadedModel, cached: CompressedKV, path: Path, qa: QA, base: CompressionConfig
) -> bool:
    """Whether a focused answer from `cached` is right."""

    def ask(artifact: CompressedKV, tokens: int):
        return answer_from_artifact(loaded, artifact, qa.question, max_new_tokens=tokens)

    answer = answer_focused(loaded, cached, path, ask, config=FocusConfig(), sampling=base.sampling,
                            max_new_tokens=ANSWER_TOKENS)  # fmt: skip
    return answer_matches(answer.text, qa.answer)


def run_videos(job: tuple[Path, CompressionConfig, float, range]) -> list[dict]:
    """Outcomes of the binding videos numbered `indices`, `seconds` long, in this process."""
    folder, base, seconds, indices = job
    torch.set_num_threads(1)
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    prompts, rows = guides(folder), []
    with tempfile.TemporaryDirectory(prefix="videoqa-binding-") as workdir:
        for index in indices:
            seed = SEED * 1000 + index
            spec = binding_spec(seed, seconds, "eval")
            path = write_video(spec, Path(workdir) / "binding.mp4")
            rows.append(one_video(loaded, base, path, spec, prompts, seed))
    print(f"{folder.name}: binding videos {indices.start}-{indices.stop - 1} done", flush=True)
    return rows


# ---- the report -----------------------------------------------------------------------------------


def methods(folder: Path) -> list[str]:
    return [QUESTION_GUIDED, *guides(folder), FOCUSED]


def measured(method: str, share: float) -> bool:
    return method != FOCUSED or share in FOCUS_SHARES


def answers(rows: list[dict], method: str, share: float, kind: str) -> list[bool]:
    return [outcomes[method, share, kind].right for outcomes in rows]


def accuracy_table(rows: list[dict], folder: Path) -> list[str]:
    """Accuracy per question type and method, at every budget."""
    lines = ["| question | method | " + " | ".join(f"{s:.0%}" for s in BUDGET_SHARES) + " |",
             "|---|---|" + "---:|" * len(BUDGET_SHARES)]  # fmt: skip
    for kind in BINDING_KINDS:
        full = pct(answers(rows, UNCOMPRESSED, 1.0, kind))
        lines.append(
            f"| {kind} | {UNCOMPRESSED} (every token) | " + " | ".join([full] * len(BUDGET_SHARES)) + " |"
        )
        for method in methods(folder):
            cells = [
                pct(answers(rows, method, s, kind)) if measured(method, s) else "-" for s in BUDGET_SHARES
            ]
            lines.append(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    return lines


def focus_table(rows: list[dict]) -> list[str]:
    """Focused minus uncompressed, paired over the same questions, per type and over all types."""
    lines = ["| question | budget | uncompressed | focused | focused - uncompressed [95% CI] |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for kind in (*BINDING_KINDS, "all"):
        kinds = BINDING_KINDS if kind == "all" else (kind,)
        full = [right for k in kinds for right in answers(rows, UNCOMPRESSED, 1.0, k)]
        for share in FOCUS_SHARES:
            focus = [right for k in kinds for right in answers(rows, FOCUSED, share, k)]
            diff, half = paired_difference(focus, full)
            lines.append(f"| {kind} | {share:.0%} | {pct(full)} | {pct(focus)} | {signed(diff, half)} |")
    return lines


def cost_table(rows: list[dict], folder: Path) -> list[str]:
    """Each cached guide minus question-guided, paired over the same questions, per type and budget; **bold**
    where the cached guide loses more than LOSS_TO_EXPLAIN."""
    cached = list(guides(folder))
    lines = ["| question | budget | " + " | ".join(f"{label} - question-guided" for label in cached) + " |",
             "|---|---:|" + "---:|" * len(cached)]  # fmt: skip
    for kind in BINDING_KINDS:
        for share in BUDGET_SHARES:
            guided = answers(rows, QUESTION_GUIDED, share, kind)
            cells = []
            for label in cached:
                diff, half = paired_difference(answers(rows, label, share, kind), guided)
                cell = signed(diff, half)
                cells.append(f"**{cell}**" if diff < -LOSS_TO_EXPLAIN else cell)
            lines.append(f"| {kind} | {share:.0%} | " + " | ".join(cells) + " |")
    return lines


def losses(rows: list[dict], folder: Path) -> list[tuple[str, float, str, float]]:
    """(guide, share, kind, difference) wherever a cached guide loses more than LOSS_TO_EXPLAIN."""
    found = []
    for label in guides(folder):
        for share in BUDGET_SHARES:
            for kind in BINDING_KINDS:
                guided = answers(rows, QUESTION_GUIDED, share, kind)
                diff, _ = paired_difference(answers(rows, label, share, kind), guided)
                if diff < -LOSS_TO_EXPLAIN:
                    found.append((label, share, kind, diff))
    return found


def evidence_table(rows: list[dict], folder: Path, share: float) -> list[str]:
    """At one budget: per question type and method, the mean share of the asked shapes' tokens kept in each
    layer, and the accuracy of the answers where that share was below the budget share in every layer."""
    num_layers = len(next(iter(rows[0].values())).kept_asked)
    header = " | ".join(f"layer {layer}" for layer in range(num_layers))
    lines = [f"| question | method | {header} | right where every layer kept < {share:.0%} |",
             "|---|---|" + "---:|" * (num_layers + 1)]  # fmt: skip
    for kind in BINDING_KINDS:
        for method in [m for m in methods(folder) if measured(m, share)]:
            outcomes = [r[method, share, kind] for r in rows]
            means = [
                sum(o.kept_asked[layer] for o in outcomes) / len(outcomes) for layer in range(num_layers)
            ]
            starved = [o.right for o in outcomes if max(o.kept_asked) < share]
            starved_cell = f"{sum(starved)}/{len(starved)}" if starved else "none"
            lines.append(
                f"| {kind} | {method} | " + " | ".join(f"{m:.0%}" for m in means) + f" | {starved_cell} |"
            )
    return lines


def plot_accuracy(ax, family: str, rows: list[dict], folder: Path) -> None:
    """Accuracy over every binding question type against the budget, per method."""

    def mean(method: str, share: float) -> float:
        values = [right for kind in BINDING_KINDS for right in answers(rows, method, share, kind)]
        return sum(values) / len(values)

    for method in methods(folder):
        shares = [s for s in BUDGET_SHARES if measured(method, s)]
        ax.plot([100 * s for s in shares], [mean(method, s) for s in shares], marker="o", label=method)
    ax.axhline(mean(UNCOMPRESSED, 1.0), color="black", linestyle="--", label=UNCOMPRESSED)
    ax.set(title=f"{family}: binding, all question types", xlabel="video budget (% of tokens)",
           ylabel="accuracy", xscale="log", ylim=(0, 1.02))  # fmt: skip
    ax.set_xticks([100 * s for s in BUDGET_SHARES], [f"{s:.0%}" for s in BUDGET_SHARES])
    ax.legend(fontsize=7)
