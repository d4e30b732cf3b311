"""Compress a video once into a `CompressedKV`; answer any number of questions from it.

index:  probe -> decode + vision once: `VisionFeatures` (kept for question-guided answers) ->
        [chunk ratios from frame distances ("paper" only)] -> text0 prefill ->
        per chunk: prefill with the guide prompt -> score -> allocate -> keep -> artifact
answer: artifact -> fresh cache over its tensors -> question prefill -> greedy decode (+ evidence)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import Cache

from worker.engine.adaretake import (
    ATTENTION_NAME,
    BudgetLedger,
    ChunkScratch,
    CompressionConfig,
    chunk_distances,
    chunk_keep_counts,
    chunk_token_counts,
    compress_chunk,
    frame_distances,
    global_ratio,
    paper_chunk_ratios,
    stack_scores,
)
from worker.engine.artifact import ARTIFACT_FORMAT, ArtifactError, CompressedKV
from worker.engine.batch import BatchedCache, Row, batched_forward
from worker.engine.decode import SampledFrame
from worker.engine.evidence import (
    EvidenceConfig,
    EvidenceScratch,
    evidence_timeline,
    scratch_for,
    top_moments,
)
from worker.engine.features import VisionFeatures
from worker.engine.generate import (
    embed_tokens,
    forward,
    greedy_decode,
    multimodal_position_ids,
    new_cache,
    preallocated_cache,
)
from worker.engine.models import LoadedModel
from worker.engine.prompt import PromptSegments, build_followup, build_prompt
from worker.engine.steps import StepFactory, Steps, drive, run_here
from worker.engine.storage import (
    ArtifactKey,
    ArtifactStore,
    BuildLock,
    file_sha256,
    get_or_build,
    settings_hash,
)
from worker.engine.timing import StageTimer
from worker.engine.vision import encode_steps

logger = logging.getLogger(__name__)


def use_adaretake_attention(loaded: LoadedModel) -> None:
    """Route the language model's attention through the scoring, per-layer-masked attention function.
    A static setting of the model (like choosing SDPA), not per-request state."""
    language_model = loaded.model.model.language_model
    if language_model.config._attn_implementation != ATTENTION_NAME:
        language_model.set_attn_implementation(ATTENTION_NAME)


def compress_video(*args, **kwargs) -> CompressedKV:
    """Run AdaReTaKe's compressed prefill over a video, in this thread: `compress_steps` (same arguments) run
    to completion."""
    return drive(compress_steps(*args, **kwargs))


@torch.inference_mode()
def compress_steps(
    loaded: LoadedModel,
    video_path: str | Path,
    config: CompressionConfig = CompressionConfig(),
    *,
    guide_question: str | None = None,
    metadata: dict | None = None,
    on_progress: Callable[[str, float], None] | None = None,
    on_frame: Callable[[SampledFrame], None] | None = None,
    features: VisionFeatures | None = None,
) -> Steps[CompressedKV]:
    """Run AdaReTaKe's compressed prefill over a video, one vision slice or one prefill chunk per step
    (`worker.engine.steps`).

    Args:
        guide_question (str): score with this question instead of the configured guide prompt
            ("question-guided" mode, as in the paper).
        metadata (dict): extra facts to store in the artifact (e.g. the video's content hash).
        on_progress: called with (stage, fraction done) as the work advances: ("decoding", 0) first, then
            "encoding" and "prefilling" fractions.
        on_frame: called with every sampled frame as it is decoded (e.g. to write thumbnails), so nothing
            is decoded twice; never called when `features` are given.
        features (VisionFeatures): the video's `encode_video(loaded, video_path, config.sampling)`, when
            already computed: decoding and vision are skipped (`video_path` is not read) and the result is
            bit-identical. ValueError when they come from another model or sampling.
    """
    use_adaretake_attention(loaded)
    timer = StageTimer()
    progress = on_progress or (lambda stage, fraction: None)
    if features is None:
        features = yield from encode_steps(
            loaded, video_path, config.sampling, timer=timer, on_progress=progress, on_frame=on_frame
        )
    else:
        features.check_fits(loaded, config.sampling)
        progress("encoding", 1.0)
    layout = features.layout
    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    frames_per_grid = loaded.vision.temporal_patch_size
    chunk_grids = config.chunk_frames // frames_per_grid
    chunk_tokens = chunk_token_counts(layout.grid_thw[0], layout.tokens_per_grid, chunk_grids)

    text0 = build_prompt(loaded.tokenizer, "").text0_ids
    guide = build_prompt(loaded.tokenizer, guide_question or config.guide_prompt).text1_ids
    video_budget = max(1, config.budget - len(text0))
    ratio = global_ratio(layout.num_tokens, video_budget)
    positions = multimodal_position_ids(loaded, len(text0), layout.grid_thw, layout.seconds_per_grid, 0)
    if ratio < 1 and config.temporal_allocation == "paper":
        # Eq. 8-9: every chunk's frame distance decides its share of the budget before the first prefill.
        distances = chunk_distances(frame_distances(features.grid_means()), chunk_grids)
        chunk_ratios = paper_chunk_ratios(distances, chunk_tokens, video_budget)
    else:
        chunk_ratios = [ratio] * len(chunk_tokens)

    cache = new_cache(loaded)
    with timer.stage("prefill"):
        forward(loaded, embed_tokens(loaded, text0), positions[:, : len(text0)], cache)
    token_frames = [[torch.full((len(text0),), -1, dtype=torch.int32)] for _ in range(num_layers)]
    kept_per_chunk = []
    ledger = BudgetLedger(chunk_ratios, chunk_tokens, num_layers)
    offset = 0
    for index, num_video in enumerate(chunk_tokens):
        first_frame = index * chunk_grids * frames_per_grid
        with timer.stage("prefill"):
            chunk_embeds = features.embeds[offset : offset + num_video].to(
                loaded.device
            )  # [num_video, hidden]
            chunk_positions = positions[:, len(text0) + offset : len(text0) + offset + num_video]
            # The guide prompt sits right after the chunk on the temporal axis: one scalar shift.
            guide_start = chunk_positions[0].max() + 1
            guide_positions = (guide_start + torch.arange(len(guide), device=loaded.device)).expand(3, -1)
            scratch = ChunkScratch(num_video=num_video, num_prompt=len(guide))
            inputs = torch.cat([chunk_embeds[None].to(loaded.dtype), embed_tokens(loaded, guide)], dim=1)
            forward(
                loaded,
                inputs,
                torch.cat([chunk_positions, guide_positions], dim=1),
                cache,
                adaretake=scratch,
            )
        with timer.stage("compress"):
            scores = stack_scores(scratch, num_layers)
            # The reference variant is not held to a budget: its ratios apply as they are.
            budgeted = config.temporal_allocation != "reference"
            chunk_ratio = ledger.ratio(index) if budgeted else chunk_ratios[index]
            keep = (
                [num_video] * num_layers
                if chunk_ratio >= 1
                else chunk_keep_counts(scores, chunk_ratio, config)
            )
            ledger.spend(keep)
            kept = compress_chunk(cache, scores, keep, num_video, len(guide))
            for layer_frames, layer_kept in zip(token_frames, kept, strict=True):
                grids = layer_kept // layout.tokens_per_grid
                layer_frames.append((first_frame + grids * frames_per_grid).int())
            kept_per_chunk.append(keep)
        offset += num_video
        progress("prefilling", (index + 1) / len(chunk_tokens))
        yield None

    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    lengths = [k.shape[2] for k in keys]
    report = {
        "frames": layout.num_frames,
        "duration": layout.duration,
        "grid_thw": list(layout.grid_thw),
        "text0_tokens": len(text0),
        "video_tokens_before": layout.num_tokens,
        "video_tokens_after_per_layer": [n - len(text0) for n in lengths],
        "video_tokens_after": sum(lengths) / num_layers - len(text0),
        "global_ratio": ratio,
        "chunk_ratios": chunk_ratios,
        "kept_per_chunk": kept_per_chunk,
        "seconds": dict(timer.seconds),
        "guide": "question" if guide_question else "generic",
        **features.metadata.get("decode", {}),  # strategy and damage (absent from features saved before)
    }
    settings = config.settings()
    return CompressedKV(
        keys=keys,
        values=values,
        token_frames=[torch.cat(frames) for frames in token_frames],
        next_position=int(positions.max()) + 1,
        timestamps=list(features.timestamps),
        metadata={
            "model": loaded.name,
            "model_revision": loaded.revision,
            "settings": settings,
            "settings_hash": settings_hash(settings),
            "report": report,
            **(metadata or {}),
        },
    )


# ---- the cache of artifacts -------------------------------------------------------------------------


def artifact_key(loaded: LoadedModel, video_hash: str, config: CompressionConfig) -> ArtifactKey:
    """Video content, exact weights and every result-changing setting (and the artifact format, so old
    and new workers never read each other's files)."""
    settings = {**config.settings(), "artifact_format": ARTIFACT_FORMAT}
    return ArtifactKey(
        video_hash=video_hash, model_revision=loaded.revision, settings_hash=settings_hash(settings)
    )


@dataclass
class IndexResult:
    """An artifact and how it was obtained.

    Args:
        hit (bool): loaded from the store rather than compressed now.
        reason (str): why it was compressed ("absent", or "corrupt: ..." when the stored one was rejected).
        seconds (dict[str, float]): "hash" (unless the hash was given), "load" and, with a lock, "wait"; on
            a miss also the compression's stages and "store".
        tier (str): the store tier that had it ("memory", "disk"), "none" when compressed now.
        waited (bool): another worker was compressing it; this call waited for its result.
    """

    artifact: CompressedKV
    key: ArtifactKey
    hit: bool
    reason: str
    nbytes: int
    seconds: dict[str, float]
    tier: str = "none"
    waited: bool = False


def get_or_compress(
    loaded: LoadedModel,
    store: ArtifactStore,
    video_path: str | Path,
    config: CompressionConfig = CompressionConfig(),
    *,
    on_progress: Callable[[str, float], None] | None = None,
    on_frame: Callable[[SampledFrame], None] | None = None,
    lock: BuildLock | None = None,
    video_hash: str | None = None,
    run: Callable[[StepFactory], object] = run_here,
) -> IndexResult:
    """The video's artifact from `store`, compressing and storing it first when absent or corrupt.

    Args:
        lock: single flight across workers (see `worker.engine.storage.get_or_build`); None in a lone process.
        video_hash (str): the file's sha256 when already known (an upload hashed on arrival), else computed.
        on_progress, on_frame: as for `compress_video`; only called when the artifact is compressed now.
        run: runs the model's work (`run_here`, or a `Scheduler`'s `run`); hashing, loading and storing
            happen in this thread.
    """
    timer = StageTimer()
    if video_hash is None:
        with timer.stage("hash"):
            video_hash = file_sha256(video_path)
    key = artifact_key(loaded, video_hash, config)
    progress = on_progress or _no_progress

    def build() -> CompressedKV:
        features = run(lambda relay: encode_steps(
            loaded, video_path, config.sampling, on_progress=relay(progress), on_frame=on_frame
        ))  # fmt: skip
        with timer.stage("store"):  # before the artifact, whose index entry counts both files
            store.put_features(key, features)
        artifact = run(lambda relay: compress_steps(
            loaded, video_path, config, metadata={"video_hash": video_hash}, on_progress=relay(progress),
            features=features,
        ))  # fmt: skip
        artifact.metadata["report"]["seconds"] |= features.metadata["seconds"]
        return artifact

    got = get_or_build(store, key, build, lock=lock, timer=timer)
    seconds = dict(timer.seconds)
    if not got.hit:
        seconds = {**got.artifact.metadata["report"]["seconds"], **seconds}
    return IndexResult(got.artifact, key, got.hit, got.reason, got.nbytes, seconds, got.tier, got.waited)


def compress_for_question(
    loaded: LoadedModel,
    store: ArtifactStore,
    video_path: str | Path,
    question: str,
    config: CompressionConfig = CompressionConfig(),
    *,
    video_hash: str | None = None,
    on_progress: Callable[[str, float], None] | None = None,
    run: Callable[[StepFactory], object] = run_here,
) -> tuple[CompressedKV, bool]:
    """Compress with `question` as the guide prompt (the paper's mode; the result is not stored), from the
    vision features the index step kept in `store` when it has them -> (artifact, whether they were reused).
    Without them (never indexed, evicted, damaged) the video is decoded and encoded again. `run` as for
    `get_or_compress`."""
    timer = StageTimer()
    if video_hash is None:
        with timer.stage("hash"):
            video_hash = file_sha256(video_path)
    with timer.stage("load"):
        try:
            features = store.get_features(artifact_key(loaded, video_hash, config))
        except ArtifactError as error:
            logger.warning("vision features refused, decoding the video again: %s", error)
            features = None
    progress = on_progress or _no_progress
    artifact = run(lambda relay: compress_steps(
        loaded, video_path, config, guide_question=question, on_progress=relay(progress), features=features
    ))  # fmt: skip
    artifact.metadata["report"]["seconds"] |= dict(timer.seconds)
    return artifact, features is not None


def _no_progress(stage: str, fraction: float) -> None:
    pass


# ---- answering from the artifact -------------------------------------------------------------------


@dataclass
class CachedAnswer:
    """An answer from a compressed cache.

    Args:
        timeline (list[tuple[float, float]]): (timestamp, share of attention) per sampled frame.
        top_moments (list[tuple[float, float]]): the highest-share timestamps, best first.
        timings (dict[str, float]): seconds: "prefill" (the question), "generate" (the decoding loop) and
            "evidence" (measuring where the question looked, once the answer is complete).
        prompt_ids (list[int]): the tokens prefilled after the cached video (history, question, header).
        history_turns (int): earlier exchanges of the conversation that fit into `prompt_ids`.
        focus (dict): for a focused answer (`worker.engine.focus`), what was re-read; else None.
    """

    text: str
    token_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    history_turns: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)
    top_moments: list[tuple[float, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    focus: dict | None = None


def cache_from_artifact(loaded: LoadedModel, artifact: CompressedKV, extra_tokens: int = 0) -> Cache:
    """A fresh cache holding a copy of the artifact's tensors, with room for `extra_tokens` more per layer
    (the question and the answer): they are written in place, so decoding allocates nothing per token
    that grows with the cache, and the artifact itself is never modified: any number of questions can
    share it."""
    cache = preallocated_cache([n + extra_tokens for n in artifact.lengths])
    for layer_idx, (keys, values) in enumerate(zip(artifact.keys, artifact.values, strict=True)):
        cache.update(keys.to(loaded.device, loaded.dtype), values.to(loaded.device, loaded.dtype), layer_idx)
    return cache


@dataclass
class QuestionPrefill:
    """A question prefilled after a cached video, ready to decode.

    Args:
        cache (Cache): the artifact's copy, the question appended, room for the answer (None when the
            question was prefilled in a batch: its row lives there).
        logits (torch.Tensor): `[vocab]` float32 logits of the prompt's last token.
        next_position (int): M-RoPE position of the first generated token.
        evidence (EvidenceScratch): collects where the question (and, for `LEGACY` evidence, the answer)
            attended.
        evidence_config (EvidenceConfig): which attention makes the answer's timeline.
    """

    cache: Cache | None
    logits: torch.Tensor
    next_position: int
    evidence: EvidenceScratch
    prompt_ids: list[int]
    history_turns: int
    text0: int
    evidence_config: EvidenceConfig = EvidenceConfig()


@dataclass(frozen=True)
class Question:
    """One question to prefill after a cached video.

    Args:
        prompt (PromptSegments): from `build_followup`: its text1 holds the history kept and the question.
        max_new_tokens (int): room left for the answer.
        evidence (EvidenceConfig): which attention makes the answer's evidence.
    """

    artifact: CompressedKV
    prompt: PromptSegments
    history_turns: int = 0
    max_new_tokens: int = 128
    evidence: EvidenceConfig = EvidenceConfig()


@torch.inference_mode()
def prefill_question(loaded: LoadedModel, question: Question) -> QuestionPrefill:
    """Prefill the question's text1 (the history kept by `build_followup`, the question, the assistant
    header) after the cached video, at its real positions, into a fresh copy of the artifact's cache with
    room for `max_new_tokens` (the artifact is untouched)."""
    use_adaretake_attention(loaded)
    artifact = question.artifact
    text0, evidence = scratch_for(artifact, question.evidence)
    text1 = question.prompt.text1_ids
    cache = cache_from_artifact(loaded, artifact, extra_tokens=len(text1) + question.max_new_tokens)
    positions = (artifact.next_position + torch.arange(len(text1), device=loaded.device)).expand(3, -1)
    logits = forward(loaded, embed_tokens(loaded, text1), positions, cache, evidence=evidence)
    return QuestionPrefill(cache, logits, artifact.next_position + len(text1), evidence, text1,
                           question.history_turns, text0, question.evidence)  # fmt: skip


@torch.inference_mode()
def prefill_questions(
    loaded: LoadedModel, questions: Sequence[Question]
) -> tuple[BatchedCache, list[QuestionPrefill]]:
    """`prefill_question` for several questions at once, in one batched forward -> the batch holding their
    caches (room for each answer) and each one's prefill."""
    use_adaretake_attention(loaded)
    longest = max(len(q.prompt.text1_ids) for q in questions)
    scratches = [scratch_for(q.artifact, q.evidence) for q in questions]
    cache = BatchedCache(
        [
            Row(
                [keys.to(loaded.device, loaded.dtype) for keys in q.artifact.keys],
                [values.to(loaded.device, loaded.dtype) for values in q.artifact.values],
                longest + q.max_new_tokens,  # the padded prompt is written whole, then the answer
                evidence,
            )
            for q, (_, evidence) in zip(questions, scratches, strict=True)
        ]
    )
    logits = batched_forward(
        loaded, cache, [q.prompt.text1_ids for q in questions], [q.artifact.next_position for q in questions]
    )
    prefills = [
        QuestionPrefill(
            None,
            row_logits,
            q.artifact.next_position + len(q.prompt.text1_ids),
            evidence,
            q.prompt.text1_ids,
            q.history_turns,
            text0,
            q.evidence,
        )  # fmt: skip
        for q, (text0, evidence), row_logits in zip(questions, scratches, logits, strict=True)
    ]
    return cache, prefills


def finish_answer(
    loaded: LoadedModel,
    artifact: CompressedKV,
    prefill: QuestionPrefill,
    token_ids: list[int],
    timings: dict[str, float],
    top_k: int = 5,
    text: str | None = None,
) -> CachedAnswer:
    """The answer's text (`text` when given: the decoded tokens cut at a stop string) and its evidence:
    where in the video the question (and, with `LEGACY` evidence, the answer) looked."""
    started = time.perf_counter()
    video_mass = prefill.evidence.video_mass()
    timeline = evidence_timeline(artifact, video_mass, prefill.text0, prefill.evidence_config)
    return CachedAnswer(
        text=loaded.tokenizer.decode(token_ids, skip_special_tokens=True) if text is None else text,
        token_ids=token_ids,
        timeline=timeline,
        top_moments=top_moments(timeline, top_k),
        timings={**timings, "evidence": time.perf_counter() - started},
        prompt_ids=prefill.prompt_ids,
        history_turns=prefill.history_turns,
    )


@torch.inference_mode()
def answer_from_artifact(
    loaded: LoadedModel,
    artifact: CompressedKV,
    question: str,
    *,
    max_new_tokens: int = 128,
    top_k: int = 5,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    history: Sequence[tuple[str, str]] = (),
    max_history_tokens: int = 2048,
    evidence: EvidenceConfig | None = None,
) -> CachedAnswer:
    """Prefill the question after the cached video at its real positions, decode greedily, and measure
    where in the video the question looked: one answer, in this thread.

    Args:
        history: the conversation's earlier (question, answer) exchanges, oldest first: placed between the
            video and the question, the newest that fit `max_history_tokens`.
        evidence (EvidenceConfig): which attention makes the evidence (default: the checkpoint's)."""
    started = time.perf_counter()
    prompt, history_turns = build_followup(loaded.tokenizer, question, history, max_history_tokens)
    asked = Question(artifact, prompt, history_turns, max_new_tokens, evidence or loaded.evidence)
    prefill = prefill_question(loaded, asked)
    prefilled = time.perf_counter()
    token_ids = greedy_decode(
        loaded,
        prefill.cache,
        prefill.logits,
        prefill.next_position,
        max_new_tokens,
        on_text,
        on_step,
        evidence=prefill.evidence,
    )
    timings = {"prefill": prefilled - started, "generate": time.perf_counter() - prefilled}
    return finish_answer(loaded, artifact, prefill, token_ids, timings, top_k)
