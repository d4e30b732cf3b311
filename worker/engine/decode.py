"""A video file -> frames sampled at a fixed rate, sized for the vision tower. PyAV only, no torch.

Sampling follows presentation timestamps, not frame counts, so variable-frame-rate files come out
right: for every target time the decoded frame nearest to it is picked, in one streaming pass. Only
picked frames are converted to RGB (swscale, straight to the target size), and at most two decoded
frames are held at a time, so CPU goes to decoding and memory does not grow with the video's length.
"""

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

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
        _, first = next(_decoded(container, stream, path))
        width, height, rotation = _display_geometry(first, path)
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
    path: str | os.PathLike, sampling: SamplingConfig = DEFAULT_SAMPLING, *, threads: int = 0
) -> Iterator[SampledFrame]:
    """Decode a video once and yield, for each time in `sample_times`, the frame nearest to it.

    A generator: frames come out while the file is being decoded, and decoding stops after the last
    target. When the video is shot slower than `sampling.fps`, one frame can be nearest to two
    targets and is then yielded twice, so the count always equals `probe(...).num_samples`.

    Args:
        path (str | os.PathLike): the video file.
        sampling (SamplingConfig): rate, cap and output size.
        threads (int): decoder threads; 0 lets FFmpeg pick one per core.

    Yields:
        SampledFrame: RGB `[out_height, out_width, 3]` images in display orientation, timestamps in
            seconds since the stream start, in time order.

    Raises:
        VideoDecodeError: one of its subclasses, naming the file and what is wrong with it.
            `CorruptVideoError` can come after some frames were yielded (data damaged half-way).
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame and slice threads
        stream.thread_count = threads
        duration = _duration(stream, path)
        targets = sample_times(duration, sampling)
        # One swscale context for all frames: frame.reformat would set up a new one for every frame.
        reformatter = VideoReformatter()
        geometry = None  # (out_width, out_height, rotation), known from the first decoded frame

        def sampled(timed_frame: tuple[float, VideoFrame], index: int) -> SampledFrame:
            timestamp, frame = timed_frame
            image = _to_rgb(frame, reformatter, *geometry)
            return SampledFrame(image=image, timestamp=timestamp, index=index)

        index = 0
        previous = None  # (time, frame): the last decoded frame before targets[index]
        for time, frame in _decoded(container, stream, path):
            if geometry is None:
                width, height, rotation = _display_geometry(frame, path)
                geometry = (*target_size(width, height, sampling.long_side, sampling.size_multiple), rotation)
            while index < len(targets) and time >= targets[index]:
                # targets[index] lies between the previous frame and this one: take the nearer (ties
                # go to the earlier). Only this frame gets converted; all others are just decoded.
                target = targets[index]
                nearer_previous = previous is not None and target - previous[0] <= time - target
                yield sampled(previous if nearer_previous else (time, frame), index)
                index += 1
            if index == len(targets):
                return  # the rest of the file is never decoded
            previous = (time, frame)

        # The stream ended with targets left: fine while they fall within the last frame's display
        # time, but far past it the data stops short of the declared duration.
        last_time, last_frame = previous
        shown_until = last_time + last_frame.duration * float(stream.time_base)
        if targets[-1] > shown_until + END_TOLERANCE:
            raise CorruptVideoError(
                f"{path}: the video stream stops at {shown_until:.2f} s of the {duration:.2f} s it "
                "declares; the file is probably truncated"
            )
        for remaining in range(index, len(targets)):
            yield sampled(previous, remaining)


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


def _decoded(
    container: InputContainer, stream: VideoStream, path: str | os.PathLike
) -> Iterator[tuple[float, VideoFrame]]:
    """`(seconds since the stream start, frame)` for every decoded frame, in presentation order."""
    start, time_base = stream.start_time or 0, float(stream.time_base)
    packets = frames = 0
    try:
        for packet in container.demux(stream):
            packets += packet.size > 0
            for frame in packet.decode():
                if frame.pts is None:
                    continue  # cannot be placed in time
                frames += 1
                yield (frame.pts - start) * time_base, frame
    except av.error.FFmpegError as e:
        raise CorruptVideoError(
            f"{path}: decoding failed after {frames} frames; the file is damaged ({e.strerror})"
        ) from e
    if frames == 0 and packets > 0:
        raise CorruptVideoError(f"{path}: {packets} video packets but not one decodable frame")
    if frames == 0:
        raise EmptyVideoError(f"{path}: the video stream has no frames")


def _display_geometry(frame: VideoFrame, path: str | os.PathLike) -> tuple[int, int, int]:
    """`(width, height, rotation)` of the frame as shown: rotation in counter-clockwise degrees."""
    _check_dimensions(frame.width, frame.height, path)
    # The display matrix gives [-180, 180]; phones only write multiples of 90.
    rotation = round(frame.rotation / 90) % 4 * 90
    if rotation in (90, 270):
        return frame.height, frame.width, rotation
    return frame.width, frame.height, rotation


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
