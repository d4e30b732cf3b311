"""bench/gpu.py, the prepared one-GPU benchmark, smoke-tested end to end on CPU with the tiny model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_shape():
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    run = subprocess.run(
        [sys.executable, "bench/gpu.py", "--shape", "tiny", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"encode: 10 frames, .*decode .*vision", out)
    assert re.search(r"index: 10 frames, 40 -> \d+ video tokens per layer", out)
    assert all(stage in out for stage in ("decode", "vision", "prefill", "compress"))
    assert re.search(r"follow-up from the artifact .*TTFT \d+\.\d+ s, [\d.]+ tokens/s", out)
    assert "question_guided: compress" in out
    assert re.search(r"serving \(scheduler\): \(a\) .*\(b\) .*\(c\) [\d.]+ answers/s", out)
    assert "serving (serial): (a)" in out
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs  # a CPU smoke run writes no figures
