"""Train small Qwen2.5-VL / Qwen2-VL checkpoints on CPU, on the synthetic needle task, in two stages.

    videoqa train-needle models/needle --family qwen2_5_vl
    videoqa train-needle out --family qwen2_5_vl --stage binding --init models/needle/qwen2_5_vl

The needle stage trains from scratch to name the colour of a lone shape (and the other needle questions).
The binding stage starts from its weights and trains on which colour belongs to which shape: stills with
1-4 shapes at once, then videos where a shape appears among 1-3 others of distinct colours.

Every step draws fresh videos from the seed (`worker.needle.videos`), renders them at the sampling
rate, passes them through a real H.264 encode and our own decoder and preprocessing (so training sees
what serving sees), and asks every question template about each video as one multi-turn conversation
after the video; the loss covers the answer tokens only. The result is an ordinary checkpoint folder
(`from_pretrained`) with the sampling settings it was trained at (`videoqa.json`) and a record of the
run (`training.json`: command, seed, losses, held-out accuracy, weights hash).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from worker.engine.config import SamplingConfig
from worker.engine.decode import sample_frames
from worker.engine.generate import multimodal_position_ids
from worker.engine.models import MODEL_CLASSES, LoadedModel, VisionSpec
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.prompt import build_prompt
from worker.needle.videos import (
    COLOURS,
    FRAME_SIZE,
    GENERIC_QUESTION,
    QA,
    SHAPES,
    VideoSpec,
    binding_questions,
    binding_spec,
    event_colour_question,
    event_map,
    questions,
    random_spec,
    render_frame,
    still_spec,
)
from worker.tools.tiny import build_tiny_model, build_tokenizer, save_checkpoint, tiny_config

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
SETTINGS_FILE = "videoqa.json"
RECORD_FILE = "training.json"

# The model: 4 layers of width 96 (6 query heads over 2 KV heads of 16 dims), a 2-block vision tower of
# width 64. About 0.9M parameters: what 20 minutes of one CPU core can train on this task.
TEXT = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_window_layers": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
}
VISION = {
    "qwen2_5_vl": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                   "out_hidden_size": TEXT["hidden_size"]},
    "qwen2_vl": {"depth": 2, "embed_dim": 64, "mlp_ratio": 2, "num_heads": 4,
                 "hidden_size": TEXT["hidden_size"]},
}  # fmt: skip
# Questions per training conversation besides the colour of every shape, drawn at random.
OTHER_QUESTIONS = 1
# Classes of the per-token targets: what each video token shows, its colour (both stages) and its kind
# (the binding stage).
TOKEN_CLASSES = ("background", *COLOURS)
SHAPE_CLASSES = ("background", *SHAPES)
STAGES = ("needle", "binding")
# Binding stage: share of its videos drawn as plain needle videos (0-3 other shapes, colours may repeat), so
# that it keeps the needle task while it learns binding.
NEEDLE_SHARE = 0.25
IGNORED = -100  # tokens a shape only grazes: neither background nor a clear needle


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Deterministic: the same config gives the same weights on the same machine.

    Args:
        family (str): "qwen2_5_vl" or "qwen2_vl".
        seed (int): initial weights and every drawn video.
        steps (int): optimizer steps.
        videos_per_step (int): videos (one conversation each) whose gradients one step averages.
        min_seconds (float): shortest training video.
        start_seconds (float): longest training video at the first step.
        max_seconds (float): longest training video from `curriculum` of the run on; evaluation goes
            beyond it.
        stills (int): first steps, on 1-second clips with one shape on screen throughout (16 video tokens):
            the vision tower learns what a needle is and attention finds it among few tokens before it has
            to find one in a long video. Without them no run learned to look (every video got one answer).
        stills_per_step (int): clips per step during `stills` (they are cheap).
        curriculum (float): share of the steps after `stills` over which the longest video grows from
            `start_seconds` to `max_seconds`.
        lr (float): peak AdamW learning rate (linear warm-up, cosine decay to 10%). At 3e-3 every run
            collapsed to one answer for all videos; 1e-3 learns.
        token_weight (float): weight of the per-token target beside the answers' loss: a linear head
            (trained, then discarded) reads from each video token the colour of the shape it shows, or
            background. Without it the answers alone never taught the model to find the needle: every
            run answered one colour for every video.
        warmup (int): warm-up steps.
        fps (float): sampling rate of training and of the checkpoint's default settings.
        threads (int): torch CPU threads (fixed, so that runs repeat exactly; one is fastest on a shared
            2-core machine, where two threads wait on each other).
        stage (str): "needle" (from scratch) or "binding" (from `init`'s weights; see `binding_config`).
        init (str | None): the checkpoint folder the binding stage starts from.
        vision_steps (int): first steps (before `stills`), on the stills of the stage, that train only the
            vision tower and the per-token head, at `vision_lr`: the language model is not run. The binding
            stage needs a tower that sees each shape's kind; trained with the answers' loss, 2400 steps
            never taught it (kind was read at chance, even of a lone shape).
        vision_lr (float): peak learning rate of the vision steps (same warm-up and decay, over them).
    """

    family: str = "qwen2_5_vl"
    seed: int = 0
    steps: int = 2000
    videos_per_step: int = 8
    min_seconds: float = 3.0
    start_seconds: float = 3.0
    max_seconds: float = 16.0
    stills: int = 400
    stills_per_step: int = 16
    curriculum: float = 0.6
    lr: float = 1e-3
    token_weight: float = 1.0
    warmup: int = 30
    fps: float = 2.0
    threads: int = 1
    stage: str = "needle"
    init: str | None = None
    vision_steps: int = 0
    vision_lr: float = 2e-3

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.stage not in STAGES or (self.stage == "binding") != (self.init is not None):
            raise ValueError(f"stage must be one of {STAGES}; the binding stage (only) needs init")
        if self.stage == "binding" and self.min_seconds < 6:
            raise ValueError("binding videos need min_seconds >= 6 (two shapes)")
        if not 3 <= self.min_seconds <= self.start_seconds <= self.max_seconds:
            raise ValueError("need 3 <= min_seconds <= start_seconds <= max_seconds (one event needs 3 s)")
        if not 0 <= self.vision_steps + self.stills <= self.steps or not 0 <= self.curriculum <= 1:
            raise ValueError("need 0 <= vision_steps + stills <= steps and 0 <= curriculum <= 1")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(fps=self.fps, long_side=FRAME_SIZE)

    @property
    def first_video(self) -> int:
        """The first step on videos: after the vision steps and the stills."""
        return self.vision_steps + self.stills

    @property
    def token_attributes(self) -> tuple[str, ...]:
        """What the per-token head learns from each video token."""
        return ("colour",) if self.stage == "needle" else ("colour", "shape")


def binding_config(family: str, init: str, seed: int = 0, **changes) -> TrainConfig:
    """The binding stage's defaults: 4000 vision steps and 300 steps of 16 stills with 1-4 shapes, then
    2100 steps of 8 videos of 6-16 s (a quarter plain needle videos), at half the needle stage's learning
    rate (the weights already see)."""
    settings = {"steps": 6400, "vision_steps": 4000, "stills": 300, "stills_per_step": 16,
                "videos_per_step": 8, "min_seconds": 6.0, "start_seconds": 8.0, "max_seconds": 16.0,
                "curriculum": 0.3, "lr": 5e-4}  # fmt: skip
    return TrainConfig(family=family, seed=seed, stage="binding", init=init, **{**settings, **changes})


def checkpoint_settings(config: TrainConfig) -> dict:
    """The serving defaults a checkpoint carries: how it was trained to see, and its generic task as the
    guide prompt of the question-agnostic compression."""
    sampling = config.sampling
    return {
        "sampling": {"fps": sampling.fps, "max_frames": sampling.max_frames, "long_side": sampling.long_side},
        "guide_prompt": GENERIC_QUESTION,
    }


# ---- one conversation ---------------------------------------------------------------------------


@dataclass
class Conversation:
    """Token ids around the video and which of them are supervised.

    Args:
        text0 (list[int]): before the video tokens.
        rest (list[int]): after them: every question, answer and turn marker.
        targets (list[bool]): per id of `rest`, whether the model is trained to predict it.
    """

    text0: list[int]
    rest: list[int]
    targets: list[bool]


def conversation(tokenizer, qas: list[QA]) -> Conversation:
    """All questions about one video as consecutive chat turns, the video in the first user turn."""
    first = build_prompt(tokenizer, qas[0].question)
    rest, targets = list(first.text1_ids), [False] * len(first.text1_ids)
    for index, qa in enumerate(qas):
        answer = tokenizer.encode(qa.answer + "<|im_end|>", add_special_tokens=False)
        rest += answer
        targets += [True] * len(answer)
        if index + 1 < len(qas):
            turn = f"\n<|im_start|>user\n{qas[index + 1].question}<|im_end|>\n<|im_start|>assistant\n"
            ids = tokenizer.encode(turn, add_special_tokens=False)
            rest += ids
            targets += [False] * len(ids)
    return Conversation(first.text0_ids, rest, targets)


def decoded_frames(spec: VideoSpec, sampling: SamplingConfig, workdir: Path) -> list:
    """The video's frames as serving sees them: rendered at the sampling times, H.264-encoded, decoded and
    sampled by our own decoder."""
    path = workdir / "train.mp4"
    rate = Fraction(sampling.fps).limit_denominator(1000)
    count = max(2, round(spec.seconds * sampling.fps))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "18"})
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(render_frame(spec, index / sampling.fps), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return [f.image for f in sample_frames(path, sampling)]


def token_targets(
    spec: VideoSpec, frames: int, vision: VisionSpec, fps: float, attribute: str = "colour"
) -> torch.Tensor:
    """Per video token (the order the vision tower emits them: time, then rows, then columns), the class of
    what it shows, in TOKEN_CLASSES (`attribute` "colour") or SHAPE_CLASSES ("shape"): the shape's colour or
    kind when the token holds at least a quarter of that shape's pixels over its frames, background where no
    shape touches it, IGNORED in between."""
    tp, side = vision.temporal_patch_size, vision.patch_size * vision.merge_size
    groups = -(-frames // tp)
    cover = torch.zeros(groups, len(spec.events), FRAME_SIZE // side, FRAME_SIZE // side)
    for index in range(groups * tp):
        shown = event_map(spec, min(index, frames - 1) / fps)  # an odd tail repeats the last frame
        for event in range(len(spec.events)):
            pixels = (shown == event).float()
            if total := pixels.sum():
                pooled = F.avg_pool2d(pixels[None, None], side, divisor_override=1)[0, 0]
                cover[index // tp, event] += pooled / total / tp
    strongest, which = cover.max(dim=1)  # [groups, rows, columns]: every video has a shape
    classes = TOKEN_CLASSES if attribute == "colour" else SHAPE_CLASSES
    values = torch.tensor([classes.index(getattr(e, attribute)) for e in spec.events], dtype=torch.long)
    labels = torch.full(strongest.shape, IGNORED, dtype=torch.long)
    labels[cover.sum(dim=1) == 0] = 0
    clear = strongest >= 0.25
    labels[clear] = values[which[clear]]
    return labels.flatten()


def batch_loss(
    loaded: LoadedModel,
    videos: list[list],
    talks: list[Conversation],
    table,
    fps: float,
    head: torch.nn.Module | None = None,
    token_labels: list[torch.Tensor] | None = None,
    token_weight: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the supervised answer tokens of several conversations, in one forward: the
    vision tower takes every video at once, the language model a right-padded batch. With `head` and
    `token_labels` (per video, `[tokens, attributes]` of `token_targets`: colour, then shape), plus
    `token_weight` times the per-token cross-entropy of each attribute."""
    model = loaded.model
    embeds, grids = video_tokens(loaded, videos, table)
    embed = model.get_input_embeddings()
    seconds_per_grid = loaded.vision.temporal_patch_size / fps  # frames sampled at `fps`
    rows, positions, wanted, labels = [], [], [], []
    for video, grid, talk in zip(embeds, grids.tolist(), talks, strict=True):
        rows.append(torch.cat([embed(torch.tensor(talk.text0)), video, embed(torch.tensor(talk.rest))]))
        positions.append(multimodal_position_ids(loaded, len(talk.text0), tuple(grid), seconds_per_grid,
                                                 len(talk.rest)))  # fmt: skip
        start = len(talk.text0) + video.shape[0]
        targets = torch.tensor(talk.targets).nonzero()[:, 0]
        wanted.append(start + targets - 1)  # the token before predicts each target
        labels.append(torch.tensor(talk.rest)[targets])
    length = max(row.shape[0] for row in rows)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        mask[index, : row.shape[0]] = 1
    inputs_embeds = torch.stack([F.pad(row, (0, 0, 0, length - row.shape[0])) for row in rows])
    position_ids = torch.stack([F.pad(p, (0, length - p.shape[1])) for p in positions], dim=1)  # [3, B, L]
    hidden = model.model.language_model(
        inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=mask, use_cache=False
    ).last_hidden_state  # [B, L, hidden]
    picked = torch.cat([hidden[index, rows_wanted] for index, rows_wanted in enumerate(wanted)])
    loss = F.cross_entropy(model.lm_head(picked).float(), torch.cat(labels))
    if head is not None and token_weight:
        loss = loss + token_weight * attribute_loss(head, embeds, token_labels)
    return loss


def video_tokens(loaded: LoadedModel, videos: list[list], table) -> tuple[tuple, torch.Tensor]:
    """The vision tower's tokens of every video at once: one [tokens, hidden] per video, and the grids."""
    inputs = [patchify_frames(frames, loaded.vision, table) for frames in videos]
    grids = torch.cat([i.video_grid_thw for i in inputs])  # [videos, 3]
    pixels = torch.cat([i.pixel_values_videos for i in inputs])
    return loaded.model.model.get_video_features(pixels, grids).pooler_output, grids


def attribute_loss(head: torch.nn.Module, embeds, token_labels: list[torch.Tensor]) -> torch.Tensor:
    """The per-token cross-entropy of each attribute (colour, then shape) the head reads from the tokens."""
    tokens = head(torch.cat(embeds)).float()
    targets = torch.cat(token_labels)  # [tokens, attributes]
    sizes = (len(TOKEN_CLASSES), len(SHAPE_CLASSES))[: targets.shape[1]]
    return sum(token_loss(logits, targets[:, column])
               for column, logits in enumerate(tokens.split(sizes, dim=1)))  # fmt: skip


def seeing_loss(loaded: LoadedModel, videos: list[list], table, head, token_labels) -> torch.Tensor:
    """The vision steps' loss: what each video token shows, from the vision tower alone."""
    return attribute_loss(head, video_tokens(loaded, videos, table)[0], token_labels)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the needle tokens plus that of the background tokens: needles are a few percent
    of a video's tokens, and a plain mean taught the head to answer background everywhere."""
    loss = logits.new_zeros(())
    for wanted in (labels > 0, labels == 0):
        if wanted.any():
            loss = loss + F.cross_entropy(logits[wanted], labels[wanted])
    return loss


# ---- the run --------------------------------------------------------------------------------------


def longest_at(config: TrainConfig, step: int) -> float:
    """The curriculum after the stills: videos start short and the longest grows to `max_seconds` over
    the `curriculum` share of the remaining steps."""
    growing = config.curriculum * (config.steps - config.first_video)
    progress = min(1.0, max(0, step - config.first_video) / growing) if growing > 0 else 1.0
    return config.start_seconds + progress * (config.max_seconds - config.start_seconds)


def videos_at(config: TrainConfig, step: int) -> int:
    return config.stills_per_step if step < config.first_video else config.videos_per_step


def still_clip(config: TrainConfig, rng: random.Random) -> tuple[VideoSpec, list[QA]]:
    """A 1-second still and its questions: one shape and its colour (needle stage), or 1-4 shapes at once
    and the colour of every shape and the shape of every colour (binding stage)."""
    if config.stage == "binding":
        spec = still_spec(rng.randrange(1 << 62), "train", rng.randint(1, 4))
        qas = binding_questions(spec)
        rng.shuffle(qas)
        return spec, qas
    return lone_still(rng)


def lone_still(rng: random.Random) -> tuple[VideoSpec, list[QA]]:
    """A 1-second clip over training footage with one shape on screen throughout, and its colour
    question."""
    spec = random_spec(rng.randrange(1 << 62), 3.0, "train", distractors=0)
    event = replace(spec.events[0], start=0.0, duration=1.0)
    return replace(spec, seconds=1.0, events=(event,)), [event_colour_question(event)]


def draw_video(config: TrainConfig, step: int, item: int) -> tuple[VideoSpec, list[QA]]:
    """A video and its conversation (a still during the first `vision_steps` + `stills` steps). Needle
    stage: the colour of every shape in it, then one other question. Binding stage: a binding video
    (NEEDLE_SHARE of them plain needle videos), the colour of every shape, the shape of every colour only one
    shape has, and one other question."""
    prefix = "" if config.stage == "needle" else f"{config.stage}:"  # the needle stage's draws as committed
    rng = random.Random(f"{prefix}{config.seed}:{step}:{item}")
    if step < config.first_video:
        return still_clip(config, rng)
    seconds = round(rng.uniform(config.min_seconds, longest_at(config, step)), 1)
    if config.stage == "binding" and rng.random() >= NEEDLE_SHARE:
        spec = binding_spec(rng.randrange(1 << 62), seconds, "train")
    else:
        spec = random_spec(rng.randrange(1 << 62), seconds, "train")
    _, *others = questions(spec, rng)
    if config.stage == "binding":
        qas = binding_questions(spec)
        others = [qa for qa in others if qa.kind not in ("colour", "shape")]
    else:
        qas = [event_colour_question(event) for event in spec.events]
    qas += rng.sample(others, min(OTHER_QUESTIONS, len(others)))
    rng.shuffle(qas)
    return spec, qas


def initial_model(config: TrainConfig, tokenizer):
    """Seeded random weights (needle stage) or the `init` checkpoint's, in float32 (binding stage)."""
    if config.init is None:
        model_config = tiny_config(config.family, tokenizer, text=TEXT, vision=VISION[config.family])
        return build_tiny_model(config.family, tokenizer, model_config, seed=config.seed)
    model_config = AutoConfig.from_pretrained(config.init)
    if model_config.model_type != config.family:
        raise ValueError(f"{config.init} holds a {model_config.model_type} checkpoint, not {config.family}")
    return MODEL_CLASSES[model_config.model_type].from_pretrained(config.init, dtype=torch.float32)


def as_loaded(model, tokenizer, family: str) -> LoadedModel:
    """The facts the engine's helpers need, for a model still in memory."""
    config = model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family,
        name="training",
        revision="training",
        vision=VisionSpec(patch_size=14, temporal_patch_size=2, merge_size=2),
        device=torch.device("cpu"),
        dtype=torch.float32,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        eos_token_ids=tuple(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])),
    )


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10%: over the vision steps from `vision_lr`, then again over
    the rest from `lr`."""
    peak, start, steps = config.lr, config.vision_steps, config.steps - config.vision_steps
    if step < config.vision_steps:
        peak, start, steps = config.vision_lr, 0, config.vision_steps
    step -= start
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, steps - config.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    loaded: LoadedModel
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(config: TrainConfig, *, log=None, stop_after: int | None = None, workers: int = 1) -> TrainResult:
    """Train from scratch; `stop_after` ends early (tests reproduce the first steps).

    Each video's gradient is computed on its own (a batch of one) and a step sums them in video order, so
    the weights do not depend on `workers`: how many processes compute those gradients in parallel."""
    torch.set_num_threads(config.threads)
    tokenizer = build_tokenizer()
    model = initial_model(config, tokenizer).train()
    torch.manual_seed(config.seed)
    classes = len(TOKEN_CLASSES) + (len(SHAPE_CLASSES) if "shape" in config.token_attributes else 0)
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, classes)  # not saved
    params = [*model.parameters(), *head.parameters()]  # every one is trained; the slots cover them all
    seeing = [*model.model.visual.parameters(), *head.parameters()]  # what the vision steps train
    optimizers = [torch.optim.AdamW(group, lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
                  for group in (seeing, params)]  # fmt: skip
    result = TrainResult(as_loaded(model, tokenizer, config.family))
    started = time.perf_counter()
    with GradientPool(config, model, head, workers) as pool:
        for step in range(stop_after or config.steps):
            optimizer = optimizers[step >= config.vision_steps]  # the language model's weights wait
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            losses = pool.gradients(step)  # [videos]; pool.slots[i]: video i's flat gradient
            videos = videos_at(config, step)
            flat = torch.stack(pool.slots[:videos]).sum(dim=0) / videos  # [num_params]
            for param in params:  # a vision step leaves the language model's without one
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()  # in place: the workers' shared parameters follow
            total = sum(losses) / videos
            result.losses.append(total)
            if log is not None and (step % 25 == 0 or step + 1 == config.steps):
                log(f"step {step:5d}  loss {total:.4f}  lr {learning_rate(config, step):.2e}  "
                    f"{time.perf_counter() - started:6.0f}s")  # fmt: skip
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


class GradientPool:
    """Per-video gradients of the current weights, in this process or in forked workers that share the
    model's parameters (and one gradient slot per video) through shared memory."""

    def __init__(self, config: TrainConfig, model, head: torch.nn.Module, workers: int) -> None:
        self.config, self.model, self.head, self.workers = config, model, head, workers
        self.params = [*model.parameters(), *head.parameters()]
        for param in self.params:
            param.share_memory_()
            param.grad = torch.zeros_like(param)
        count = sum(p.numel() for p in self.params)
        most = max(config.videos_per_step, config.stills_per_step if config.first_video else 0)
        self.slots = [torch.zeros(count).share_memory_() for _ in range(most)]
        self._processes: list = []

    def __enter__(self) -> GradientPool:
        if self.workers > 1:
            context = torch.multiprocessing.get_context("fork")
            self._tasks, self._done = context.Queue(), context.Queue()
            for _ in range(self.workers):
                process = context.Process(target=self._serve, daemon=True)
                process.start()
                self._processes.append(process)
        else:
            self._workdir = tempfile.TemporaryDirectory(prefix="videoqa-train-")
        return self

    def __exit__(self, *exc) -> None:
        for _ in self._processes:
            self._tasks.put(None)
        for process in self._processes:
            process.join(timeout=30)
        if not self._processes:
            self._workdir.cleanup()

    def gradients(self, step: int) -> list[float]:
        """Fill every slot with its video's gradient; returns the videos' losses."""
        items = range(videos_at(self.config, step))
        if not self._processes:
            return [self._gradient(step, item, Path(self._workdir.name)) for item in items]
        for item in items:
            self._tasks.put((step, item))
        losses = {}
        for _ in items:
            item, loss = self._done.get(timeout=600)
            if isinstance(loss, str):
                raise RuntimeError(f"training worker failed: {loss}")
            losses[item] = loss
        return [losses[item] for item in items]

    def _gradient(self, step: int, item: int, workdir: Path) -> float:
        spec, qas = draw_video(self.config, step, item)
        frames = decoded_frames(spec, self.config.sampling, workdir)
        loaded = as_loaded(self.model, _tokenizer(), self.config.family)
        for param in self.params:
            param.grad = None
        talk = conversation(loaded.tokenizer, qas)
        labels = torch.stack([token_targets(spec, len(frames), loaded.vision, self.config.fps, attribute)
                              for attribute in self.config.token_attributes], dim=1)  # fmt: skip
        if step < self.config.vision_steps:
            loss = seeing_loss(loaded, [frames], _table(loaded.vision), self.head, [labels])
        else:
            loss = batch_loss(loaded, [frames], [talk], _table(loaded.vision), self.config.fps,
                              self.head, [labels], self.config.token_weight)  # fmt: skip
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.slots[item].copy_(torch.nn.utils.parameters_to_vector(grads))
        return loss.item()

    def _serve(self) -> None:
        torch.set_num_threads(self.config.threads)
        with tempfile.TemporaryDirectory(prefix="videoqa-train-") as workdir:
            while (job := self._tasks.get()) is not None:
                step, item = job
                try:
                    self._done.put((item, self._gradient(step, item, Path(workdir))))
                except Exception as error:  # the parent raises it; a dead worker would hang the step
                    self._done.put((item, repr(error)))


@functools.cache
def _tokenizer():
    return build_tokenizer()


@functools.cache
def _table(spec: VisionSpec) -> torch.Tensor:
    return normalisation_table(spec)


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as weights:
        while chunk := weights.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_trained(result: TrainResult, config: TrainConfig, folder: Path, record: dict) -> Path:
    """The checkpoint, its serving settings and the record of how it was made."""
    save_checkpoint(result.loaded.model, result.loaded.tokenizer, folder)
    (folder / SETTINGS_FILE).write_text(json.dumps(checkpoint_settings(config), indent=2) + "\n")
    record = {
        "command": "videoqa " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
        "config": asdict(config),
        "seconds": round(result.seconds, 1),
        "first_losses": result.losses[:5],
        "losses_every_25": result.losses[::25],
        "final_loss": sum(result.losses[-25:]) / len(result.losses[-25:]),
        **({"init": init_record(Path(config.init))} if config.init else {}),
        **record,
        "weights_sha256": weights_sha256(folder),
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def init_record(folder: Path) -> dict:
    """What a binding stage started from: the weights' hash and how they were made."""
    made = folder / RECORD_FILE
    return {
        "weights_sha256": weights_sha256(folder),
        "training": json.loads(made.read_text()) if made.exists() else None,
    }


# ---- held-out evaluation ----------------------------------------------------------------------------


def colour_accuracy(
    loaded: LoadedModel,
    sampling: SamplingConfig,
    seconds: float,
    count: int,
    workdir: Path,
    *,
    distractors: int | str | None,
    seed: int = 0,
) -> float:
    """Share of held-out videos (eval backgrounds, needle anywhere) whose colour question the model
    answers right, uncompressed, through the real decoder: encoded at 4 fps, sampled at the checkpoint's
    rate. `distractors`: other shapes in the video (None: 0-3 at random, colours may repeat; "binding":
    1-3, every shape and colour distinct, `binding_spec`)."""
    from worker.engine.answer import answer_uncompressed
    from worker.needle.videos import answer_matches, colour_question, write_video

    right = 0
    for index in range(count):
        if distractors == "binding":
            spec = binding_spec(seed * 1_000_003 + index, seconds, "eval")
        else:
            spec = random_spec(seed * 1_000_003 + index, seconds, "eval", distractors=distractors)
        path = write_video(spec, workdir / f"eval-{seconds:g}-{index}.mp4")
        qa = colour_question(spec)
        answer = answer_uncompressed(loaded, path, qa.question, sampling=sampling, max_new_tokens=4)
        right += answer_matches(answer.text, qa.answer)
        path.unlink()
    return right / count


def evaluate(loaded: LoadedModel, config: TrainConfig, count: int) -> dict[str, float]:
    """Colour accuracy at the longest training length and at 2x and 4x it: of the needle alone (the
    needle task), among 0-3 other shapes, and among 1-3 other shapes of other colours (the binding task:
    the model must tell which shape was asked for)."""
    torch.set_num_threads(config.threads)
    accuracy = {}
    kinds = (("needle alone", 0), ("with 0-3 other shapes", None), ("among 1-3 other shapes", "binding"))
    with tempfile.TemporaryDirectory(prefix="videoqa-eval-") as workdir:
        for factor in (1, 2, 4):
            seconds = config.max_seconds * factor
            for label, distractors in kinds:
                accuracy[f"{factor}x ({seconds:g} s), {label}"] = colour_accuracy(
                    loaded, config.sampling, seconds, count, Path(workdir), distractors=distractors
                )
    return accuracy
