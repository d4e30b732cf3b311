"""Frame thumbnails: small JPEGs of the frames the engine samples, written while it decodes them.

One file per sampled frame, `<index>.jpg` (the index of the frame in the artifact's timeline), at most
THUMBNAIL_WIDTH pixels wide, in `Settings.frames_dir(artifact_key)`: videos with the same bytes share
them like they share the artifact, and the API deletes them with it. They are gathered in a private
directory and moved into place only when the compression succeeds, so a failed one leaves nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from worker.engine.decode import SampledFrame

THUMBNAIL_WIDTH = 160


def encode_jpeg(image: np.ndarray, width: int = THUMBNAIL_WIDTH) -> bytes:
    """`image` `[height, width, 3]` uint8 RGB as a baseline JPEG at most `width` pixels wide (never upscaled),
    keeping the aspect ratio; sides rounded to even numbers for 4:2:0."""
    height_in, width_in = image.shape[:2]
    out_width = min(width, width_in) // 2 * 2
    out_height = max(2, round(height_in * out_width / width_in / 2) * 2)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame = frame.reformat(width=out_width, height=out_height, format="yuvj420p", interpolation="AREA")
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = out_width, out_height, "yuvj420p"
    codec.time_base = Fraction(1, 25)  # required by the encoder, meaningless for one still
    codec.options = {"qmin": "2", "qmax": "6"}  # mjpeg's default quantiser range blurs small frames
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


class ThumbnailWriter:
    """`on_frame` for `compress_video`: one JPEG per sampled frame, published by `commit()`.

    Args:
        target (Path): the directory the thumbnails end up in.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.staging = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
        self.count = 0

    def __call__(self, frame: SampledFrame) -> None:
        if self.count == 0:
            self.staging.mkdir(parents=True)
        (self.staging / f"{frame.index}.jpg").write_bytes(encode_jpeg(frame.image))
        self.count += 1

    def commit(self) -> None:
        """Move what was written into `target` (replacing older files of the same names). No-op if nothing."""
        if self.count == 0:
            return
        try:
            os.rename(self.staging, self.target)  # the usual case: no thumbnails there yet
            return
        except OSError:
            pass  # a rebuild over existing thumbnails: replace them one by one
        for path in self.staging.iterdir():
            os.replace(path, self.target / path.name)
        self.staging.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
