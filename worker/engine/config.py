"""Settings that change what the model sees. Frozen: passed down explicitly, never mutated."""

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SamplingConfig:
    """How a video becomes frames.

    Args:
        fps (float): frames sampled per second of video.
        max_frames (int): cap on sampled frames; longer videos are sampled uniformly over their whole length.
        long_side (int): the longest side of a sampled frame is at most this many pixels (never upscaled).
        size_multiple (int): frame sides are rounded to multiples of this (patch 14 x spatial merge 2).
    """

    fps: float = 2.0
    max_frames: int = 2048
    long_side: int = 448
    size_multiple: int = 28

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if self.long_side < self.size_multiple:
            raise ValueError(f"long_side must be at least {self.size_multiple}, got {self.long_side}")


def default_cache_dir() -> Path:
    """VIDEOQA_CACHE_DIR, else the per-user cache directory (XDG_CACHE_HOME or ~/.cache) + /videoqa."""
    if configured := os.environ.get("VIDEOQA_CACHE_DIR"):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "videoqa"
