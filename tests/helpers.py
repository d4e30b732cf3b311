"""Factories for tests: synthetic videos written with PyAV (never the ffmpeg CLI), and damaged copies.

Synthetic frames carry their ordinal as a gray level (see `frame_level` / `level_to_ordinal`), so a
test can tell which frame was sampled, and a white square in the coded top-left corner, so it can
tell which way the picture is turned.
"""

import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Gray levels 20, 26, ..., 236: 37 steps far enough apart to survive YUV 4:2:0 and lossy coding.
_FIRST_LEVEL, _LEVEL_STEP, _NUM_LEVELS = 20, 6, 37
_MARKER_LEVEL = 255
_TIME_BASE = Fraction(1, 1000)


def frame_level(ordinal: int) -> int:
    """Gray level of the `ordinal`-th synthetic frame (wraps after 37 frames)."""
    return _FIRST_LEVEL + _LEVEL_STEP * (ordinal % _NUM_LEVELS)


def level_to_ordinal(image: np.ndarray) -> int:
    """The ordinal (modulo 37) of the synthetic frame `image` [height, width, 3] was decoded from."""
    height, width = image.shape[:2]
    center = image[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3]
    return round((float(np.median(center)) - _FIRST_LEVEL) / _LEVEL_STEP) % _NUM_LEVELS


def synthetic_frame(ordinal: int, width: int, height: int) -> np.ndarray:
    """`[height, width, 3]` uint8 RGB: flat gray `frame_level(ordinal)`, a white square top-left."""
    image = np.full((height, width, 3), frame_level(ordinal), np.uint8)
    marker = max(2, min(width, height) // 4)
    image[:marker, :marker] = _MARKER_LEVEL
    return image


def make_video(
    path: Path,
    *,
    width: int = 112,
    height: int = 56,
    fps: float = 10.0,
    seconds: float = 3.0,
    timestamps: list[float] | None = None,
    codec: str = "libx264",
    rotation: int | None = None,
    faststart: bool = False,
    gop: int | None = None,
    keyframes: list[int] | None = None,
    bframes: int = 0,
) -> list[float]:
    """Encode a synthetic video.

    Args:
        path (Path): output file; the container follows the suffix (.mp4, .mkv, ...).
        width (int): coded width (even, for 4:2:0).
        height (int): coded height (even).
        fps (float): constant frame rate, used when `timestamps` is None.
        seconds (float): length at constant frame rate.
        timestamps (list[float] | None): presentation time of every frame, for variable frame rate.
        codec (str): "libx264" or "mpeg4".
        rotation (int | None): display-matrix rotation in counter-clockwise degrees (phones write
            these), read back by FFmpeg as `frame.rotation`.
        faststart (bool): MP4 index (moov) before the data, so a truncated copy still opens.
        gop (int | None): libx264: a keyframe every `gop` frames (none but the first when None).
        keyframes (list[int] | None): libx264: ordinals of frames forced to be keyframes.
        bframes (int): libx264: B-frames between references (constant frame rate only, see below).

    Returns:
        list[float]: the presentation time of every frame written, in seconds.
    """
    if timestamps is None:
        timestamps = [i / fps for i in range(round(seconds * fps))]
    options = {"movflags": "+faststart"} if faststart else {}
    # Near-lossless, so gray levels survive. x264 without B-frames: with them it derives decode times
    # from earlier frames' presentation times and, at uneven spacing, the MP4 track comes out short.
    codec_options = (
        {"preset": "ultrafast", "crf": "1", "bf": str(bframes)} if codec == "libx264" else {"b": "4M"}
    )
    if codec == "libx264":
        # No scene-cut keyframes: the tests place them (a flat frame after another is a "scene cut").
        codec_options |= {"g": str(gop or 100_000), "x264-params": "scenecut=0"}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=round(fps), options=codec_options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = _TIME_BASE
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for ordinal, time in enumerate(timestamps):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(ordinal, width, height), format="rgb24")
            frame.pts, frame.time_base = round(time / _TIME_BASE), _TIME_BASE
            if keyframes and ordinal in keyframes:
                frame.pict_type = av.video.frame.PictureType.I
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return timestamps


def make_audio_only(path: Path, *, seconds: float = 1.0) -> None:
    """An AAC file (the container follows the suffix, e.g. .mp4 or .m4a) with a 440 Hz tone, no video."""
    rate, samples = 16000, 1024
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, round(seconds * rate), samples):
            t = np.arange(start, start + samples) / rate
            tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [channels, samples]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    """The first `fraction` of `source`'s bytes, as an interrupted upload leaves them."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def garbled_copy(source: Path, target: Path, *, at: float = 0.5, size: int = 20_000, seed: int = 0) -> Path:
    """`source` with `size` random bytes written over it from `at` (a fraction of its length) on."""
    data = bytearray(source.read_bytes())
    start = int(len(data) * at)
    data[start : start + size] = random.Random(seed).randbytes(min(size, len(data) - start))
    target.write_bytes(bytes(data))
    return target


def parse_sse(text: str) -> tuple[list[dict], list[str]]:
    """-> (events as {id, event, data}, comment lines)."""
    events, comments = [], []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line.startswith(":"):
                comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            events.append(fields)
    return events, comments
