"""`videoqa calibrate-evidence`: which attention heads of a checkpoint point at the moment a question asks
about.

Needle videos (`worker.needle.videos`, the train split's footage: the benchmark's held-out videos are
never seen) each show one shape for 1-2 seconds; the question is its colour. Each video is compressed at
every share of `CalibrationConfig.shares` of its video tokens (1.0: uncompressed) with the checkpoint's
own settings, and the question is prefilled after each cache (nothing is decoded). Every (layer, query
head) then has a timeline of its own, and a hit where its top frame lies within `GROUNDING_SECONDS` of
the needle's visible interval. The heads are ranked by hits on half the videos, the prefix length is the
shortest whose combined timeline (`worker.engine.evidence.evidence_timeline`) hits most often there, and
that choice stands only if on the other half of the videos it hits more often than every head together;
else the evidence keeps every head (a few heads picked on a few dozen videos can fit those videos and
nothing else). Videos, compressions and ranking follow from the seed alone, so a calibration repeats
exactly.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.adaretake import CompressionConfig
from worker.engine.engine import Question, compress_video, prefill_question
from worker.engine.evidence import EvidenceConfig, evidence_timeline, head_timelines, top_moments
from worker.engine.models import LoadedModel
from worker.engine.prompt import build_prompt
from worker.engine.vision import encode_video
from worker.needle.videos import Event, colour_question, random_spec, write_video

GROUNDING_SECONDS = 1.0
FULL = 1.0  # a share that keeps every video token


@dataclass(frozen=True)
class CalibrationConfig:
    """Args:
    videos (int): needle videos drawn.
    seed (int): draws the videos (`random_spec(seed * 100_003 + index, ..., "train")`).
    seconds (float): length of each video.
    shares (tuple[float, ...]): video-token budgets each video is compressed to (1.0: every token).
    """

    videos: int = 64
    seed: int = 0
    seconds: float = 32.0
    shares: tuple[float, ...] = (0.05, 0.10, FULL)

    def __post_init__(self):
        if self.videos < 1:
            raise ValueError(f"videos must be at least 1, got {self.videos}")
        if not self.shares or not all(0 < share <= 1 for share in self.shares):
            raise ValueError(f"shares must lie in (0, 1], got {self.shares}")


@dataclass
class Case:
    """One video at one budget: the question's view of its cache and where the needle was."""

    artifact: object  # CompressedKV
    video_mass: dict[int, torch.Tensor]  # per layer [heads, video tokens]
    text0: int
    needle: Event


@dataclass(frozen=True)
class Calibration:
    """Args:
    heads (tuple[tuple[int, int], ...]): the chosen (layer, head) pairs, best-ranked first; empty: every
        head (no smaller set did better on the held-out half).
    hits (list[list[int]]): per layer and head, the cases whose top frame was the needle's.
    cases (int): videos x shares.
    grounded (dict[str, float]): share of the held-out half's cases grounded by the heads chosen on the
        other half, and by every head.
    """

    heads: tuple[tuple[int, int], ...]
    hits: list[list[int]]
    cases: int
    grounded: dict[str, float]
    config: CalibrationConfig

    def settings(self) -> dict:
        """The `evidence` entry of the checkpoint's `videoqa.json`."""
        return {
            "source": "question",
            "heads": [list(pair) for pair in self.heads],
            "calibration": {
                **dataclasses.asdict(self.config),
                "cases": self.cases,
                "grounded": {name: round(value, 4) for name, value in self.grounded.items()},
                "hits_per_head": self.hits,
            },
        }


def grounded(moment: float, needle: Event, tolerance: float = GROUNDING_SECONDS) -> bool:
    """Whether `moment` (seconds) lies within `tolerance` of the needle's visible interval."""
    return needle.start - tolerance <= moment <= needle.start + needle.duration + tolerance


def needle_cases(
    loaded: LoadedModel,
    base: CompressionConfig,
    config: CalibrationConfig,
    on_video: Callable[[int], None] | None = None,
) -> list[Case]:
    """Every (video, share) of the calibration, in order."""
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    cases = []
    with tempfile.TemporaryDirectory(prefix="videoqa-calibrate-") as workdir:
        for index in range(config.videos):
            spec = random_spec(config.seed * 100_003 + index, config.seconds, "train", distractors=0)
            path = write_video(spec, Path(workdir) / "needle.mp4")
            prompt = build_prompt(loaded.tokenizer, colour_question(spec).question)
            features = encode_video(loaded, path, base.sampling)
            for share in config.shares:
                tokens = features.layout.num_tokens
                budget = text0 + (tokens if share >= FULL else max(1, round(share * tokens)))
                compression = dataclasses.replace(base, budget=budget)
                artifact = compress_video(loaded, path, compression, features=features)
                prefill = prefill_question(loaded, Question(artifact, prompt, max_new_tokens=0))
                cases.append(Case(artifact, prefill.evidence.video_mass(), prefill.text0, spec.target))
            if on_video is not None:
                on_video(index + 1)
    return cases


def hit_rate(cases: list[Case], evidence: EvidenceConfig) -> float:
    """Share of cases whose combined timeline's top moment is the needle's."""
    hits = 0
    for case in cases:
        timeline = evidence_timeline(case.artifact, case.video_mass, case.text0, evidence)
        hits += grounded(top_moments(timeline, 1)[0][0], case.needle)
    return hits / len(cases)


def head_hits(cases: list[Case]) -> torch.Tensor:
    """`[layers, heads]`: in how many cases each head's own top frame was the needle's."""
    hits = None
    for case in cases:
        per_head = head_timelines(case.artifact, case.video_mass, case.text0)  # [layers, heads, frames]
        times = torch.tensor(case.artifact.timestamps, dtype=torch.float64)[per_head.argmax(dim=-1)]
        needle = case.needle
        on = (times >= needle.start - GROUNDING_SECONDS) & (
            times <= needle.start + needle.duration + GROUNDING_SECONDS
        )
        hits = on.long() if hits is None else hits + on.long()
    return hits


def ranked_heads(hits: torch.Tensor) -> list[tuple[int, int]]:
    num_layers, num_heads = hits.shape
    pairs = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    return sorted(pairs, key=lambda pair: (-int(hits[pair]), pair))


def best_prefix(cases: list[Case], ranked: list[tuple[int, int]]) -> int:
    """The shortest prefix of `ranked` whose combined timeline hits most often in `cases`."""
    rates = [
        hit_rate(cases, EvidenceConfig(heads=tuple(ranked[:count]))) for count in range(1, len(ranked) + 1)
    ]
    return rates.index(max(rates)) + 1


def choose_heads(cases: list[Case], config: CalibrationConfig) -> Calibration:
    """Rank heads and pick a prefix on the even videos; keep it, re-ranked on all of them, if it beats every
    head on the odd videos."""
    per_video = len(config.shares)
    fit = [case for index, case in enumerate(cases) if index // per_video % 2 == 0]
    check = [case for index, case in enumerate(cases) if index // per_video % 2 == 1] or fit
    ranked = ranked_heads(head_hits(fit))
    count = best_prefix(fit, ranked)
    chosen = hit_rate(check, EvidenceConfig(heads=tuple(ranked[:count])))
    every = hit_rate(check, EvidenceConfig())
    hits = head_hits(cases)
    heads = tuple(ranked_heads(hits)[:count]) if chosen > every else ()
    grounded = {"chosen heads, held-out half": chosen, "every head, held-out half": every}
    return Calibration(heads, hits.tolist(), len(cases), grounded, config)


def calibrate(
    loaded: LoadedModel,
    base: CompressionConfig,
    config: CalibrationConfig = CalibrationConfig(),
    on_video: Callable[[int], None] | None = None,
) -> Calibration:
    """Run the calibration's needle videos through `loaded` at `base`'s settings and choose its heads."""
    return choose_heads(needle_cases(loaded, base, config, on_video), config)
