"""A video file -> frames sampled at a fixed rate, sized for the vision tower. PyAV only, no torch.

Sampling follows presentation timestamps, not frame counts, so variable-frame-rate files come out
right: every target time `k / fps` gets a decoded frame within half a sampling interval of it. Only
picked frames are converted to RGB (swscale, straight to the target size), and at most a few decoded
frames are held at a time, so memory does not grow with the video's length.

Decoding costs what the sampler needs, not what the file holds. Per video, from the stream's keyframe
interval (probed from packets, no decoding) and the sampling interval, the cheapest strategy that still
puts every sample within half an interval of its target:

- `seek`: per sample, seek to the keyframe at or before it; that keyframe is the sample when it lies
  within half an interval, else decoding goes forward to the nearest frame. For indexed containers
  (MP4/MOV, Matroska/WebM) when keyframes come at least every half interval, or when the keyframe
  interval is short enough that seeking decodes fewer frames than reading straight through.
- `keyframes`: one pass that decodes keyframes only (other packets never reach the decoder), for
  containers without an index. Should a keyframe gap turn out longer than the probe promised, the
  packets of that gap are decoded after all, so the guarantee holds.
- `nonref`: one pass with FFmpeg skipping frames no kept frame refers to: every B-frame where a short
  probe decodes the rest bit for bit as a full pass (x264's B-pyramid), else the non-reference frames;
  when the probe shows the frames left are never more than an interval apart.
- `all`: one pass decoding every frame, the nearest to each target is picked (the default for
  streams with long keyframe intervals and no droppable frames).

`all` and `nonref` in an indexed container run on one single-threaded decoder per core, each decoding
its own span: the samples of one keyframe interval, from its keyframe, the spans yielded in order. FFmpeg's
frame threads spend about a fifth more CPU per frame than one thread does, and a span stops at its last
sample, so the frames between an interval's last sample and the next keyframe are never decoded. A file
whose seeks land on no keyframe is decoded in one pass on FFmpeg's threads.

Damaged data is decoded around the way FFmpeg does: a packet that fails to decode is counted and
skipped, a frame FFmpeg flags corrupt is dropped. A sample with no good frame within half an interval
is lost: it repeats the nearest good frame (so the count stays `num_samples`, as ffmpeg's fps filter
repeats frames) and its seconds are reported in `SampledVideo.damage`. More than half of the samples
lost (`MIN_DECODED_FRACTION`) fails the video with `CorruptVideoError`.
"""

import bisect
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.stream import Disposition
from av.video.frame import VideoFrame
from av.video.reformatter import Interpolation, VideoReformatter
from av.video.stream import VideoStream

from worker.engine.config import SamplingConfig

# Beyond these Qwen's vision tower cannot make sense of a frame, and decoding one risks the memory.
MAX_SIDE = 8192
MAX_ASPECT_RATIO = 200
# Seconds a target may lie past the end of the last decoded frame before the stream counts as cut
# short; declared and actual ends differ by a frame or so in healthy files.
END_TOLERANCE = 1.0
# Bicubic, like ffmpeg's scale filter and Qwen's own image processor; swscale widens the kernel
# when downscaling, so it does not alias.
INTERPOLATION = Interpolation.BICUBIC
# A sample counts as lost when no good frame lies within half an interval of it; a video with more than
# half of its samples lost fails as corrupt (an interrupted upload, a file mostly garbage), one with
# less is indexed around the damage (a long recording with a bad stretch).
MIN_DECODED_FRACTION = 0.5
Strategy = Literal["all", "nonref", "keyframes", "seek"]
STRATEGIES: tuple[Strategy, ...] = ("all", "nonref", "keyframes", "seek")
# Containers whose index makes a seek land exactly on the keyframe at or before the asked time (MPEG-TS
# and friends seek by guessing byte offsets).
SEEKABLE_FORMATS = ("mp4", "matroska")
# Where keyframe gaps are measured, as fractions of the duration (only the start without an index).
KEYFRAME_PROBE_POINTS = (0.0, 1 / 3, 2 / 3)
# Skipping non-reference frames is probed on the first seconds, and used only if it drops enough.
NONREF_PROBE_SECONDS = 2.0
NONREF_WORTHWHILE = 0.8
# Demuxing errors in a row after which the rest of the file counts as lost.
MAX_DEMUX_ERRORS = 100
# Frozen, so one shared default is safe.
DEFAULT_SAMPLING = SamplingConfig()
# Leading bytes of common video containers besides MP4 (box type at offset 4) and MPEG-TS (sync bytes).
_SIGNATURES = (
    b"\x1a\x45\xdf\xa3",  # Matroska, WebM
    b"RIFF",  # AVI
    b"FLV",
    b"OggS",
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x30\x26\xb2\x75",  # ASF, WMV
)


@dataclass(frozen=True)
class SampledFrame:
    """One sampled frame.

    Args:
        image (np.ndarray): `[height, width, 3]` uint8 RGB, at the target size, in display orientation.
        timestamp (float): presentation time in seconds since the start of the video stream.
        index (int): 0-based ordinal among the sampled frames.
    """

    image: np.ndarray
    timestamp: float
    index: int


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video, and what `sample_frames` will make of it.

    Args:
        duration (float): seconds from the start of the video stream to its end.
        width (int): display width in pixels, after rotation.
        height (int): display height in pixels, after rotation.
        rotation (int): degrees (0, 90, 180 or 270) the coded frames are turned counter-clockwise to
            display them.
        codec (str): FFmpeg's name of the video codec, e.g. "h264".
        average_fps (float | None): average frame rate, when the container knows it.
        num_samples (int): how many frames `sample_frames` yields with the same `SamplingConfig`.
        out_width (int): width of the sampled frames.
        out_height (int): height of the sampled frames.
    """

    duration: float
    width: int
    height: int
    rotation: int
    codec: str
    average_fps: float | None
    num_samples: int
    out_width: int
    out_height: int


class VideoDecodeError(Exception):
    """Base of the errors a user's file can cause. `code` is stable and machine-readable."""

    code = "video_decode_error"


class NotAVideoError(VideoDecodeError):
    """Not a media container at all, e.g. a text file named .mp4."""

    code = "not_a_video"


class NoVideoStreamError(VideoDecodeError):
    """A valid media file without a video stream, e.g. audio only."""

    code = "no_video_stream"


class CorruptVideoError(VideoDecodeError):
    """Truncated or damaged data: the file looks like media but cannot be read to its end."""

    code = "corrupt_video"


class EmptyVideoError(VideoDecodeError):
    """A zero-byte file, or a video stream without frames or duration."""

    code = "empty_video"


class VideoTooLargeError(VideoDecodeError):
    """Frame dimensions beyond what the model can take (a side or the aspect ratio)."""

    code = "video_too_large"


def target_size(width: int, height: int, long_side: int, multiple: int = 28) -> tuple[int, int]:
    """Size of the sampled frames: the long side at most `long_side`, each side a multiple of `multiple`.

    Args:
        width (int): display width of the video.
        height (int): display height of the video.
        long_side (int): upper bound on the longer output side; smaller videos are not upscaled.
        multiple (int): every output side is a multiple of this (patch size x spatial merge).

    Returns:
        tuple[int, int]: `(out_width, out_height)`.
    """
    if width < 1 or height < 1 or long_side < multiple:
        raise ValueError(f"bad size request: {width}x{height}, long_side={long_side}, multiple={multiple}")
    scale = min(1.0, long_side / max(width, height))
    # Rounding to nearest (as Qwen's smart_resize does) can overshoot, so cap at the largest multiple
    # that still fits in long_side.
    cap = long_side // multiple * multiple

    def fit(side: int) -> int:
        return min(cap, max(multiple, round(side * scale / multiple) * multiple))

    return fit(width), fit(height)


def sample_times(duration: float, sampling: SamplingConfig) -> list[float]:
    """Target timestamps: `k / fps` for every k that falls inside the video, at most `max_frames` of them.

    Args:
        duration (float): length of the video stream in seconds.
        sampling (SamplingConfig): the rate and the cap.

    Returns:
        list[float]: ascending times in seconds, the first at 0. At least one, even for a tiny duration.
            Past the cap the rate is lowered instead, so `max_frames` times cover the whole video evenly.
    """
    if not duration >= 0:
        raise ValueError(f"duration must be non-negative, got {duration}")
    rate = sampling.fps
    # floor keeps the last target (n-1)/fps strictly before the end; the epsilon stops float error in
    # duration * fps (4.9999999 for 5 s) from dropping a target, and cannot push one past the end.
    n = max(1, math.floor(duration * rate + 1e-6))
    if n > sampling.max_frames:
        n, rate = sampling.max_frames, sampling.max_frames / duration
    return [k / rate for k in range(n)]


def probe(path: str | os.PathLike, sampling: SamplingConfig = DEFAULT_SAMPLING) -> VideoInfo:
    """Read a video's metadata and its first frame (for the rotation), without decoding the rest.

    Args:
        path (str | os.PathLike): the video file.
        sampling (SamplingConfig): used for `num_samples` and the output size.

    Returns:
        VideoInfo: the video's duration, display size and rotation, and what sampling will yield.

    Raises:
        VideoDecodeError: one of its subclasses, naming the file and what is wrong with it.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        duration = _duration(stream, path)
        with contextlib.closing(_FrameSource(container, stream, path)) as source:
            first = source.next()
            if first is None:
                source.raise_if_nothing_decoded()
            width, height, rotation = _display_geometry(first.frame, path)
        out_width, out_height = target_size(width, height, sampling.long_side, sampling.size_multiple)
        return VideoInfo(
            duration=duration,
            width=width,
            height=height,
            rotation=rotation,
            codec=stream.codec_context.name,
            average_fps=float(stream.average_rate) if stream.average_rate else None,
            num_samples=len(sample_times(duration, sampling)),
            out_width=out_width,
            out_height=out_height,
        )


def sample_frames(
    path: str | os.PathLike,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    *,
    threads: int = 0,
    strategy: Strategy | None = None,
    times: Sequence[float] | None = None,
) -> "SampledVideo":
    """Decode a video and yield, for each time in `sample_times`, a frame within half an interval of it.

    Lazy: nothing is read before the first frame is asked for, frames come out while the file is being
    decoded, and decoding stops after the last target. When the video is shot slower than
    `sampling.fps`, one frame can serve two targets and is then yielded twice, so the count always
    equals `probe(...).num_samples`.

    Args:
        path (str | os.PathLike): the video file.
        sampling (SamplingConfig): rate, cap and output size.
        threads (int): decoders at once, one per core when 0: single-threaded decoders on spans of
            the video for `all` and `nonref` (`_spans`), else that many FFmpeg threads; 1 decodes in
            one pass on one thread.
        strategy (Strategy | None): force one decoding strategy; None picks the cheapest for this video
            (`choose_strategy`).
        times (Sequence[float] | None): sample these seconds (ascending; those past the end are dropped)
            instead of every `1 / fps`, e.g. windows around a few moments. Where the container can seek,
            decoding then seeks to each window (`seek`) and reads nothing between them.

    Returns:
        SampledVideo: an iterator of `SampledFrame` (RGB `[out_height, out_width, 3]` images in display
            orientation, timestamps in seconds since the stream start, in time order); once exhausted,
            its `strategy` and `damage` say how it was decoded and which seconds were lost.

    Raises:
        VideoDecodeError: one of its subclasses, naming the file and what is wrong with it, while
            iterating. `CorruptVideoError` can come after some frames were yielded (too much damage).
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return SampledVideo(path, sampling, threads=threads, strategy=strategy, times=times)


@dataclass(frozen=True)
class Damage:
    """What a damaged file cost the sampling.

    Args:
        lost_samples (int): samples with no good frame within half an interval; each repeats the
            nearest good frame.
        num_samples (int): all samples.
        seconds (tuple[tuple[float, float], ...]): `(start, end)` spans of the video the lost samples
            stand for (half an interval either side of each), merged, in time order.
        decode_errors (int): packets FFmpeg failed to read or decode, plus frames it flagged corrupt.
    """

    lost_samples: int = 0
    num_samples: int = 0
    seconds: tuple[tuple[float, float], ...] = ()
    decode_errors: int = 0


@dataclass(frozen=True)
class StreamStructure:
    """What `probe_structure` learns about a stream's coding, for `choose_strategy`.

    Args:
        keyframe_interval (float): the longest gap between keyframes seen, in seconds; `math.inf` when a
            probe window held fewer than two keyframes.
        seekable (bool): the container has an index that seeking follows exactly (MP4/MOV, Matroska).
        nonref_gap (float | None): the longest gap between frames left when non-reference frames are
            skipped, over the first seconds (None: not probed).
        nonref_fraction (float): the share of frames those are.
        nonref_skip (str): FFmpeg's `skip_frame` that leaves them: "NONREF", or "BIDIR" (every B-frame)
            where the probe decoded the frames left bit for bit as a full pass does.
    """

    keyframe_interval: float
    seekable: bool
    nonref_gap: float | None = None
    nonref_fraction: float = 1.0
    nonref_skip: str = "NONREF"


def choose_strategy(structure: StreamStructure, interval: float) -> Strategy:
    """The cheapest strategy that keeps every sample within `interval / 2` of its target.

    Args:
        structure (StreamStructure): from `probe_structure`.
        interval (float): seconds between sample targets.
    """
    keyframes = structure.keyframe_interval
    if keyframes <= interval / 2:  # some keyframe within tolerance of every target: decode one per sample
        return "seek" if structure.seekable else "keyframes"
    nonref = structure.nonref_gap is not None and structure.nonref_gap <= interval
    nonref = nonref and structure.nonref_fraction <= NONREF_WORTHWHILE
    # Straight through decodes `interval * fraction` seconds of frames per sample; seeking about half a
    # keyframe interval (from the keyframe to the target).
    per_sample = interval * (structure.nonref_fraction if nonref else 1.0)
    if structure.seekable and keyframes / 2 < per_sample:
        return "seek"
    return "nonref" if nonref else "all"


def probe_structure(
    path: str | os.PathLike, interval: float, duration: float, frames_probe: bool = True
) -> StreamStructure:
    """Measure what `choose_strategy` needs: keyframe gaps from packets alone (at the start and, where
    the container can seek, a third and two thirds in), and, unless keyframes already decide or the
    stream has no B-frames, what skipping B-frames (where that is exact) or else non-reference frames
    leaves of the first `NONREF_PROBE_SECONDS`.

    Args:
        path (str | os.PathLike): the video file (opened anew: a caller's position is left alone).
        interval (float): seconds between sample targets: keyframe gaps are measured up to two of them.
        duration (float): the video stream's length in seconds.
        frames_probe (bool): whether to decode the first seconds to weigh skipping frames (False: the
            keyframe gaps only, packets without decoding).
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        seekable = any(name in container.format.name.split(",") for name in SEEKABLE_FORMATS)
        start, time_base = stream.start_time or 0, float(stream.time_base)
        # Without B-frames (as the codec parameters say, before decoding) every frame is a reference.
        droppable = bool(stream.codec_context.has_b_frames)
        gaps = []
        for point in KEYFRAME_PROBE_POINTS if seekable else KEYFRAME_PROBE_POINTS[:1]:
            if point:
                container.seek(start + round(point * duration / time_base), stream=stream)
            gaps.append(_keyframe_gap(container, stream, window=2 * interval))
    structure = StreamStructure(keyframe_interval=max(gaps), seekable=seekable)
    if structure.keyframe_interval <= interval / 2 or not droppable or not frames_probe:
        return structure
    full = _skip_probe(path, "DEFAULT")
    # Skipping every B-frame is exact when no other frame refers to one (x264's B-pyramid keeps its
    # reference B-frames to other B-frames): then the frames left decode bit for bit as in a full pass.
    kept = _skip_probe(path, "BIDIR")
    skip = "BIDIR"
    if not kept or any(full.get(time) != digest for time, digest in kept.items()):
        kept, skip = _skip_probe(path, "NONREF"), "NONREF"
    if len(kept) < 2:
        return structure
    times = sorted(kept)
    gap = max(b - a for a, b in itertools.pairwise(times))
    return dataclasses.replace(
        structure, nonref_gap=gap, nonref_fraction=len(kept) / len(full), nonref_skip=skip
    )


def _skip_probe(path: str | os.PathLike, skip: str) -> dict[float, bytes]:
    """The frames of the first `NONREF_PROBE_SECONDS` decoded with `skip_frame=skip`: time -> pixel digest."""
    frames = {}
    with _open(path) as container:
        stream = _video_stream(container, path)
        start, time_base = stream.start_time or 0, float(stream.time_base)
        stream.codec_context.skip_frame = skip
        for packet in _packets(container, stream):
            if packet.pts is not None and (packet.pts - start) * time_base > NONREF_PROBE_SECONDS:
                break
            for frame in _decode(packet):
                if frame.pts is not None:
                    pixels = frame.to_ndarray().tobytes()
                    frames[(frame.pts - start) * time_base] = hashlib.blake2b(pixels, digest_size=16).digest()
    return frames


def _keyframe_gap(container: InputContainer, stream: VideoStream, window: float) -> float:
    """The longest gap between keyframe packets from the current position on, reading until `window`
    seconds past the first keyframe (or the stream's end, which then closes the last gap); `math.inf` if
    the window holds no second keyframe."""
    time_base, keys, time = float(stream.time_base), [], None
    for packet in _packets(container, stream):
        if packet.pts is None:
            continue
        time = packet.pts * time_base
        if packet.is_keyframe:
            keys.append(time)
        if keys and time - keys[0] > window:
            break
    else:  # the stream ended inside the window
        keys.append(time)
    keys = sorted(k for k in keys if k is not None)
    if len(keys) < 2:
        return math.inf
    return max(b - a for a, b in itertools.pairwise(keys))


@dataclass
class _Decoded:
    time: float  # presentation time, seconds since the stream start
    end: float  # until when it is shown
    frame: VideoFrame

    def distance(self, target: float) -> float:
        """Seconds between `target` and the span this frame is shown."""
        if target < self.time:
            return self.time - target
        return max(0.0, target - self.end)


def _pick(source, first, targets, tolerance: float, tail: float, seek_over: float | None = None):
    """For each target, the nearest good frame (ties to the earlier) and whether it is lost: farther than
    `tolerance` from it (`tail` past the last frame). `first` is the source's first frame, None if it has
    none (then every target is lost, without a frame). `seek_over`: seek when a keyframe interval this
    long lies between the frame at hand and the target (the `seek` strategy)."""
    previous, current, last_good = None, first, first
    for target in targets:
        sought = False
        if seek_over is not None and current is not None and current.time < target - tolerance:
            if target - current.time > seek_over:  # a keyframe lies in between
                source.seek(target)
                previous, current, sought = None, source.next(), True
        if not (sought and current is not None and current.distance(target) <= tolerance):
            while current is not None and current.time < target:
                previous, current = current, source.next()
            last_good = current or previous or last_good
        # Either side may be missing.
        nearer_previous = previous is not None and (
            current is None or target - previous.time <= current.time - target
        )
        chosen = previous if nearer_previous else current or last_good
        near = [f.distance(target) for f in (previous, current) if f is not None]
        yield chosen, min(near, default=math.inf) > (tail if current is None else tolerance)


@dataclass(frozen=True)
class _Span:
    """Samples `first` to `stop` (exclusive) of a video, decoded from the keyframe at `start` (time-base
    units, None: from the beginning)."""

    start: int | None
    first: int
    stop: int


@dataclass
class _Decoding:
    """What decoding a span gave: per sample `(index, timestamp, image | None, lost)`, in order."""

    picks: list
    errors: int
    data_ends: float
    frames: int  # decoded


def _spans(path: str | os.PathLike, targets: list[float]) -> list[_Span]:
    """Cut the samples into spans, one per keyframe interval that holds samples, found by seeking to every
    target (the container's index, no decoding). A seek that lands on no keyframe gives one span (decode
    straight through)."""
    starts = [(None, 0.0)]  # (keyframe pts, its seconds since the stream start)
    with _open(path) as container:
        stream = _video_stream(container, path)
        start, time_base = stream.start_time or 0, float(stream.time_base)
        for target in targets[1:]:
            container.seek(start + math.floor(target / time_base), stream=stream)
            packet = next(_packets(container, stream), None)
            if packet is None or packet.pts is None or not packet.is_keyframe:
                return [_Span(None, 0, len(targets))]
            time = (packet.pts - start) * time_base
            if time > starts[-1][1]:
                starts.append((packet.pts, time))
    firsts = [0] + [bisect.bisect_left(targets, time) for _, time in starts[1:]]
    return [
        _Span(pts, first, stop)
        for (pts, _), first, stop in zip(starts, firsts, [*firsts[1:], len(targets)], strict=True)
        if first < stop
    ]


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SampledVideo(Iterator[SampledFrame]):
    """The frames `sample_frames` yields, and afterwards how they were decoded.

    Attributes:
        strategy (Strategy | None): the decoding strategy, known once the first frame was asked for.
        damage (Damage): lost samples and seconds so far; final once the iterator is exhausted.
        decoded_frames (int): good frames the decoder gave, once the iterator is exhausted.
    """

    def __init__(
        self, path, sampling: SamplingConfig, *, threads: int, strategy: Strategy | None, times=None
    ) -> None:
        self.path = path
        self.times = None if times is None else sorted(times)
        self.sampling = sampling
        self.threads = threads
        self.strategy = strategy
        self.damage = Damage()
        self.decoded_frames = 0
        self._frames = self._sample()

    def __next__(self) -> SampledFrame:
        return next(self._frames)

    def close(self) -> None:
        """Stop decoding now (a consumer that stops early), rather than when the cycle collector runs."""
        self._frames.close()

    def report(self) -> dict:
        """JSON-ready facts of the decoding: strategy, lost samples, damaged seconds, decode errors."""
        return {
            "decode_strategy": self.strategy,
            # [start, end] spans of seconds whose samples lie in damaged data (repeating the nearest good one)
            "damaged_seconds": [list(span) for span in self.damage.seconds],
            "lost_frames": self.damage.lost_samples,
            "decode_errors": self.damage.decode_errors,
        }

    def _sample(self) -> Iterator[SampledFrame]:
        path, sampling = self.path, self.sampling
        # The stack closes the frame source before the container (see _FrameSource.close).
        with _open(path) as container, contextlib.ExitStack() as stack:
            stream = _video_stream(container, path)
            duration = _duration(stream, path)
            if self.times is None:
                targets = sample_times(duration, sampling)
            else:
                targets = [t for t in self.times if 0 <= t <= duration] or [min(self.times[0], duration)]
            interval = targets[1] - targets[0] if len(targets) > 1 else duration
            tolerance = interval / 2
            chosen = self.times is not None  # a few windows: never decode what lies between them
            structure = probe_structure(path, interval, duration, frames_probe=not chosen)
            if chosen and structure.seekable:
                self.strategy = self.strategy or "seek"
            self.strategy = self.strategy or choose_strategy(structure, interval)
            decoders = self.threads or _cores()
            if decoders > 1 and self.strategy in ("all", "nonref") and structure.seekable:
                if len(spans := _spans(path, targets)) > 1:
                    geometry = self._first_geometry(container, stream)
                    yield from self._sample_spans(
                        spans, targets, duration, tolerance, structure, decoders, geometry
                    )
                    return
            # Frame threads delay every output by a frame per thread: after a seek, those are wasted.
            stream.thread_type = "SLICE" if self.strategy == "seek" else "AUTO"
            stream.thread_count = self.threads
            if self.strategy == "nonref":
                stream.codec_context.skip_frame = structure.nonref_skip
            tail = max(tolerance, END_TOLERANCE)  # declared and actual ends differ a little in healthy files

            def uncovered(start: float, end: float) -> bool:
                # A target between two keyframes with neither within tolerance: the gap needs decoding.
                return any(start + tolerance < t < end - tolerance for t in targets)

            source = _FrameSource(
                container, stream, path, keyframes_only=self.strategy == "keyframes", needs_gap=uncovered
            )
            stack.enter_context(contextlib.closing(source))
            first = source.next()
            if first is None:
                source.raise_if_nothing_decoded()
            seek_over = structure.keyframe_interval if self.strategy == "seek" else None
            picks = _pick(source, first, targets, tolerance, tail, seek_over=seek_over)
            reformatter = VideoReformatter()  # one swscale context for all frames
            geometry = None  # (out_width, out_height, rotation), known from the first decoded frame
            lost: list[float] = []
            for index, (target, (chosen, missed)) in enumerate(zip(targets, picks, strict=True)):
                if missed:
                    lost.append(target)
                    self._count_lost(lost, targets, duration, tolerance, source.errors, source.data_ends)
                geometry = geometry or _output_geometry(chosen.frame, path, sampling)
                image = _to_rgb(chosen.frame, reformatter, *geometry)
                yield SampledFrame(image=image, timestamp=chosen.time, index=index)
            self.damage = self._damage(lost, targets, duration, tolerance, source.errors)
            self.decoded_frames = source.frames

    def _first_geometry(self, container, stream) -> tuple[int, int, int]:
        """The output geometry, from the stream's first good frame: every span scales to it, as one pass
        scales every frame to its first (a stream may change resolution mid-way)."""
        with contextlib.closing(_FrameSource(container, stream, self.path)) as source:
            if (first := source.next()) is None:
                source.raise_if_nothing_decoded()
            self.decoded_frames += source.frames
            return _output_geometry(first.frame, self.path, self.sampling)

    def _sample_spans(self, spans, targets, duration, tolerance, structure, decoders, geometry) -> Iterator:
        """`all` and `nonref` on `decoders` single-threaded decoders at once, each on its own span of
        keyframes (`_spans`), yielded in order. One thread per decoder costs less CPU per frame than
        FFmpeg's frame threads, and the spans still keep every core busy. At most `decoders + 1` spans'
        images are held, so memory stays bounded; closing the iterator stops the decoders at their next
        sample."""
        stop, lost, errors = threading.Event(), [], 0
        ran_out = []  # where spans found the packets ending
        last = None  # the latest frame yielded: what a lost sample without a frame of its own repeats
        waiting = []  # lost samples before any frame decoded: they repeat the first one (too many fail)
        skip = structure.nonref_skip if self.strategy == "nonref" else "DEFAULT"
        with (
            contextlib.closing(_Containers(self.path, skip)) as containers,
            ThreadPoolExecutor(decoders, thread_name_prefix="decode") as pool,  # joined before they close
        ):
            jobs = (
                pool.submit(self._decode_span, span, targets, tolerance, geometry, containers, stop)
                for span in spans
            )
            running = collections.deque(itertools.islice(jobs, decoders + 1))
            try:
                while running:
                    done = running.popleft().result()
                    running.extend(itertools.islice(jobs, 1))
                    errors += done.errors
                    self.decoded_frames += done.frames
                    if done.data_ends < math.inf:
                        ran_out.append(done.data_ends)
                    for index, timestamp, image, missed in done.picks:
                        if missed:
                            lost.append(targets[index])
                            ends = max(ran_out, default=math.inf)
                            self._count_lost(lost, targets, duration, tolerance, errors, ends)
                        if image is None and last is None:
                            waiting.append(index)
                            continue
                        if image is None:
                            image, timestamp = last.image, last.timestamp
                        for held in waiting:
                            yield SampledFrame(image=image, timestamp=timestamp, index=held)
                        waiting, last = [], SampledFrame(image=image, timestamp=timestamp, index=index)
                        yield last
            finally:
                stop.set()
                for job in running:
                    job.cancel()
        self.damage = self._damage(lost, targets, duration, tolerance, errors)

    def _decode_span(self, span: _Span, targets, tolerance: float, geometry, containers, stop) -> _Decoding:
        """Decode one span on one thread: its samples' images, lost or not, in order."""
        tail = max(tolerance, END_TOLERANCE) if span.stop == len(targets) else tolerance
        with containers.borrow(seek_to=span.start) as (container, stream, reformatter):
            with contextlib.closing(_FrameSource(container, stream, self.path)) as source:
                first = source.next()
                picks = _pick(source, first, targets[span.first : span.stop], tolerance, tail)
                decoded = []
                for index, (chosen, missed) in enumerate(picks, start=span.first):
                    if stop.is_set():
                        break
                    image = None if chosen is None else _to_rgb(chosen.frame, reformatter, *geometry)
                    decoded.append((index, chosen.time if chosen else None, image, missed))
        return _Decoding(decoded, source.errors, source.data_ends, source.frames)

    def _count_lost(self, lost, targets, duration: float, tolerance: float, errors: int, data_ends: float):
        """Record the lost samples so far; too many of them fail the video."""
        self.damage = self._damage(lost, targets, duration, tolerance, errors)
        if len(lost) > len(targets) * (1 - MIN_DECODED_FRACTION):
            raise self._too_damaged(data_ends, duration)

    @staticmethod
    def _damage(lost: list[float], targets: list[float], duration: float, tolerance: float, errors: int):
        spans: list[tuple[float, float]] = []
        for target in lost:
            start, end = max(0.0, target - tolerance), min(duration, target + tolerance)
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        seconds = tuple((round(a, 3), round(b, 3)) for a, b in spans)
        return Damage(lost_samples=len(lost), num_samples=len(targets), seconds=seconds, decode_errors=errors)

    def _too_damaged(self, data_ends: float, duration: float) -> CorruptVideoError:
        damage = self.damage
        share = f"{damage.lost_samples} of {damage.num_samples} samples"
        if data_ends < duration - END_TOLERANCE:  # the packets themselves stop short
            return CorruptVideoError(
                f"{self.path}: the video stream stops at {data_ends:.2f} s of the {duration:.2f} s "
                f"it declares ({share} missing); the file is probably truncated"
            )
        return CorruptVideoError(
            f"{self.path}: {share} lie in data that does not decode ({damage.decode_errors} damaged "
            f"packets so far); at least {MIN_DECODED_FRACTION:.0%} must decode"
        )


class _Containers:
    """Open containers of one file for the span decoders, each on one thread with `skip`, and a swscale
    context each. A span borrows one and gives it back, so a later span seeks instead of opening the file
    again (opening an MP4 reads its whole index: 12 ms for 10 minutes) and scales without setting up
    swscale again (1.7 ms). `close` closes them all, once no span is decoding."""

    def __init__(self, path: str | os.PathLike, skip: str) -> None:
        self.path, self.skip = path, skip
        self._free = queue.SimpleQueue()  # what `borrow` gives, while no span is using it

    @contextlib.contextmanager
    def borrow(self, seek_to: int | None) -> Iterator[tuple[InputContainer, VideoStream, VideoReformatter]]:
        """A container at the keyframe `seek_to` (time-base units; None: a new one, at the start), its
        video stream and a reformatter. A container that failed is closed, not given back."""
        try:
            opened = self._free.get_nowait() if seek_to is not None else self._open()
        except queue.Empty:
            opened = self._open()
        container, stream, _ = opened
        try:
            if seek_to is not None:
                container.seek(seek_to, stream=stream)
            yield opened
        except BaseException:
            container.close()
            raise
        self._free.put(opened)

    def close(self) -> None:
        while not self._free.empty():
            self._free.get()[0].close()

    def _open(self) -> tuple[InputContainer, VideoStream, VideoReformatter]:
        container = _open(self.path)
        try:
            stream = _video_stream(container, self.path)
        except BaseException:
            container.close()
            raise
        stream.thread_count = 1
        stream.codec_context.skip_frame = self.skip
        return container, stream, VideoReformatter()


class _FrameSource:
    """Good frames of one stream in presentation order, read around damage the way FFmpeg does: a packet
    that fails to decode is counted and skipped, a frame flagged corrupt is counted and dropped.

    With `keyframes_only`, packets other than keyframes are held back (one keyframe gap of compressed
    data) and reach the decoder only when `needs_gap(start, end)` says a target between the keyframes
    around them has neither within tolerance."""

    def __init__(self, container, stream, path, *, keyframes_only: bool = False, needs_gap=None) -> None:
        self.container, self.stream, self.path = container, stream, path
        self.keyframes_only, self.needs_gap = keyframes_only, needs_gap
        self.start, self.time_base = stream.start_time or 0, float(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        self.frame_duration = 1 / float(rate) if rate else 0.0
        self.errors = self.packets = self.frames = 0
        self.data_ends = math.inf  # seconds: where the packets ran out, once they have
        self._iterator = self._decoded()

    def next(self) -> _Decoded | None:
        return next(self._iterator, None)

    def seek(self, time: float) -> None:
        """Continue from the keyframe at or before `time` (seconds since the stream start)."""
        self.close()
        self.container.seek(self.start + math.floor(time / self.time_base), stream=self.stream)
        self._iterator = self._decoded()

    def close(self) -> None:
        """Stop reading, before the container closes. A reading left suspended when the container closes
        keeps FFmpeg's buffers until Python's cycle collector gets to it (the source and its generator
        refer to each other): 10 MiB per 10-minute video, which piled up job after job."""
        self._iterator.close()

    def raise_if_nothing_decoded(self) -> None:
        if self.packets:
            raise CorruptVideoError(f"{self.path}: {self.packets} video packets but not one decodable frame")
        raise EmptyVideoError(f"{self.path}: the video stream has no frames")

    def _decoded(self) -> Iterator[_Decoded]:
        held, held_from = [], None  # keyframes_only: the packets after the last keyframe, its time
        last = 0.0
        for packet in _packets(self.container, self.stream, self):
            self.packets += packet.size > 0
            if packet.pts is not None:
                last = max(last, (packet.pts - self.start) * self.time_base)
            if not packet.size:
                self.data_ends = last
            if self.keyframes_only:
                time = None if packet.pts is None else (packet.pts - self.start) * self.time_base
                if packet.size and not packet.is_keyframe:
                    held.append(packet)
                    continue
                # A keyframe, or the end: decode the gap before it only if a target needs it.
                until = time if packet.size else math.inf
                if held and None not in (held_from, until) and self.needs_gap(held_from, until):
                    yield from (frame for held_packet in held for frame in self._frames(held_packet))
                held, held_from = [], time
            yield from self._frames(packet)

    def _frames(self, packet) -> Iterator[_Decoded]:
        for frame in _decode(packet, self):
            if frame.pts is None:
                continue  # cannot be placed in time
            if frame.is_corrupt:
                self.errors += 1
                continue
            self.frames += 1
            time = (frame.pts - self.start) * self.time_base
            shown = frame.duration * self.time_base if frame.duration else self.frame_duration
            yield _Decoded(time=time, end=time + shown, frame=frame)


def _packets(container: InputContainer, stream: VideoStream, counter=None) -> Iterator:
    """The stream's packets; a demuxing error is skipped (and counted on `counter.errors`) like ffmpeg
    does, up to MAX_DEMUX_ERRORS in a row."""
    failures = 0
    while True:
        try:
            for packet in container.demux(stream):
                failures = 0
                yield packet
            return
        except av.error.FFmpegError:
            failures += 1
            if counter is not None:
                counter.errors += 1
            if failures >= MAX_DEMUX_ERRORS:
                return


def _decode(packet, counter=None) -> list[VideoFrame]:
    """The packet's frames; none (and one more on `counter.errors`) when FFmpeg cannot decode it."""
    try:
        return packet.decode()
    except av.error.FFmpegError:
        if counter is not None:
            counter.errors += 1
        return []


def _open(path: str | os.PathLike) -> InputContainer:
    # A missing or unreadable file raises OSError here: that is the caller's problem, not the video's.
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(f"{path}: the file is empty (0 bytes)")
    try:
        return av.open(os.fspath(path), metadata_errors="ignore")
    except av.error.FFmpegError as e:
        # FFmpeg says "invalid data" both for a text file and for an MP4 cut before its index (moov),
        # so the leading bytes tell the two apart.
        with open(path, "rb") as f:
            head = f.read(512)
        if _has_container_signature(head):
            raise CorruptVideoError(
                f"{path}: looks like a media file but cannot be opened; it is probably truncated or "
                f"damaged ({e.strerror})"
            ) from e
        raise NotAVideoError(f"{path}: not a video file, no known container format ({e.strerror})") from e


def _has_container_signature(head: bytes) -> bool:
    """Whether `head` starts like one of the common video containers."""
    iso_bmff = head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # mp4, mov, 3gp
    mpeg_ts = len(head) > 188 and head[0] == head[188] == 0x47  # sync byte every 188-byte packet
    return iso_bmff or mpeg_ts or head.startswith(_SIGNATURES)


def _video_stream(container: InputContainer, path: str | os.PathLike) -> VideoStream:
    # Cover art in a music file is a one-picture "video" stream; it does not make the file a video.
    streams = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    if not streams:
        found = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise NoVideoStreamError(f"{path}: no video stream (found: {found})")
    stream = streams[0]
    # Declared dimensions are checked before anything is decoded; 0 means "unknown until decoded".
    if stream.width and stream.height:
        _check_dimensions(stream.width, stream.height, path)
    return stream


def _check_dimensions(width: int, height: int, path: str | os.PathLike) -> None:
    if max(width, height) > MAX_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise VideoTooLargeError(
            f"{path}: frames are {width}x{height}; at most {MAX_SIDE} px a side and an aspect ratio "
            f"of {MAX_ASPECT_RATIO}:1 are supported"
        )


def _duration(stream: VideoStream, path: str | os.PathLike) -> float:
    """Seconds from the start of the video stream to its end."""
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = _scan_duration(path, stream.index)
    if not duration > 0:
        raise EmptyVideoError(f"{path}: the video stream has zero duration")
    return duration


def _scan_duration(path: str | os.PathLike, stream_index: int) -> float:
    # Matroska and WebM keep no per-stream duration, and the container's also counts the audio, which
    # can run longer. Demuxing the video packets without decoding them is cheap and exact. A separate
    # open, because not every container can seek back to its start.
    try:
        with av.open(os.fspath(path), metadata_errors="ignore") as container:
            stream = container.streams[stream_index]
            ends = (p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None)
            end = max(ends, default=None)
            if end is None:
                raise EmptyVideoError(f"{path}: the video stream has no frames with timestamps")
            return float((end - (stream.start_time or 0)) * stream.time_base)
    except av.error.FFmpegError as e:
        raise CorruptVideoError(f"{path}: cannot read the video stream to its end ({e.strerror})") from e


def _display_geometry(frame: VideoFrame, path: str | os.PathLike) -> tuple[int, int, int]:
    """`(width, height, rotation)` of the frame as shown: rotation in counter-clockwise degrees."""
    _check_dimensions(frame.width, frame.height, path)
    # The display matrix gives [-180, 180]; phones only write multiples of 90.
    rotation = round(frame.rotation / 90) % 4 * 90
    if rotation in (90, 270):
        return frame.height, frame.width, rotation
    return frame.width, frame.height, rotation


def _output_geometry(frame: VideoFrame, path, sampling: SamplingConfig) -> tuple[int, int, int]:
    """`(out_width, out_height, rotation)` of the sampled frames, from a decoded one."""
    width, height, rotation = _display_geometry(frame, path)
    return (*target_size(width, height, sampling.long_side, sampling.size_multiple), rotation)


def _to_rgb(
    frame: VideoFrame, reformatter: VideoReformatter, width: int, height: int, rotation: int
) -> np.ndarray:
    """The frame as `[height, width, 3]` uint8 RGB in display orientation."""
    # swscale cannot rotate: scale in coded orientation, then turn the small RGB image.
    coded_width, coded_height = (height, width) if rotation in (90, 270) else (width, height)
    # One swscale thread: the decoder's threads already keep every core busy, and for an output this
    # small, slice threads cost more CPU than they save.
    rgb = reformatter.reformat(
        frame, width=coded_width, height=coded_height, format="rgb24", interpolation=INTERPOLATION, threads=1
    )
    image = rgb.to_ndarray()  # [coded_height, coded_width, 3]
    if rotation:
        # np.rot90 turns counter-clockwise, like the display matrix; the copy makes the array
        # contiguous again (torch.from_numpy rejects negative strides).
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
    return image
