"""bench/needle.py runs end to end, in a child process as a person runs it, on the committed qwen2_5_vl
checkpoint, within a minute each (smoke mode writes nothing): every method at every budget on two needle
videos, and every binding question type under every method and guide on one binding video."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = (
    "uncompressed (every token)",
    "question-guided adakv + paper",
    "cached adakv + paper (default)",
    "question-guided adakv + reference",
    "question-guided even + paper",
    "question-guided pyramid + paper",
    "random eviction",
    "uniform frame subsampling",
    "focused (cached default, re-read)",
)


BINDING_METHODS = (
    "uncompressed (every token)",
    "question-guided",
    "cached, task guide",
    "cached, product default guide",
    "cached, minimal guide",
    "focused (task guide's cache, re-read)",
)


def smoke_rows(task: str) -> list[list[str]]:
    """The table rows a smoke run of `task` prints, as cells; it must take under a minute and write
    nothing."""
    doc = (ROOT / "docs" / "benchmarks.md").read_bytes()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "bench/needle.py", "--smoke", "--task", task, "--families", "qwen2_5_vl"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == doc
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ") and "[" in line]
    return [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in lines]


@pytest.mark.slow
def test_smoke_run_covers_every_method_and_budget():
    rows = smoke_rows("needle")
    assert [row[0] for row in rows] == list(METHODS)
    budgets = [4] * (len(METHODS) - 1) + [2]  # a share and its interval at each budget; focused at 5 and 10%
    assert all(" ".join(row).count("%") >= 3 * n for row, n in zip(rows, budgets, strict=True))


@pytest.mark.slow
def test_binding_smoke_run_covers_every_question_type_method_and_guide():
    rows = smoke_rows("binding")
    kinds = ("colour", "shape", "count", "order", "when")
    assert [(row[0], row[1]) for row in rows] == [
        (kind, method) for kind in kinds for method in BINDING_METHODS
    ]
    budgets = [2 if row[1].startswith("focused") else 3 for row in rows]  # focused at 5 and 10% only
    assert all(" ".join(row).count("%") >= 3 * n for row, n in zip(rows, budgets, strict=True))
