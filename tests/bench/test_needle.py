"""bench/needle.py runs end to end: every method at every budget on two needle videos, in a child process
as a person runs it, on the committed qwen2_5_vl checkpoint, within a minute (smoke mode writes nothing)."""

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
)


@pytest.mark.slow
def test_smoke_run_covers_every_method_and_budget():
    doc = (ROOT / "docs" / "benchmarks.md").read_bytes()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "bench/needle.py", "--smoke", "--families", "qwen2_5_vl"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "[" in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(METHODS)
    assert all(row.count("%") >= 4 * 3 for row in rows)  # four budgets, each a share and its interval
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == doc
