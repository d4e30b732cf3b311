"""The worker's allocator: jemalloc preloaded into the processes `videoqa serve` starts."""

import ctypes.util
import os
import subprocess
import sys

import pytest

from worker.serving.allocator import PRELOAD, allocator_in_use, with_jemalloc

INSTALLED = ctypes.util.find_library("jemalloc") is not None
REPORT = "from worker.serving.allocator import allocator_in_use; print(allocator_in_use())"


def allocator_of_child(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(not INSTALLED, reason="libjemalloc is not installed (Debian: libjemalloc2)")
def test_a_process_started_with_jemalloc_runs_on_it_and_keeps_other_preloads():
    plain = {name: value for name, value in os.environ.items() if name != PRELOAD}
    assert allocator_of_child(plain) == "glibc malloc"
    assert allocator_of_child(with_jemalloc(plain)) == "jemalloc"
    # Another preloaded library (a profiler, say) stays, after jemalloc.
    other = ctypes.util.find_library("m")
    env = with_jemalloc({**plain, PRELOAD: other})
    assert env[PRELOAD].split() == [ctypes.util.find_library("jemalloc"), other]
    assert allocator_of_child(env) == "jemalloc"


def test_without_jemalloc_the_environment_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    env = {"PATH": "/usr/bin"}
    assert with_jemalloc(env) == env


def test_this_process_names_its_allocator():
    expected = "jemalloc" if "jemalloc" in os.environ.get(PRELOAD, "") else "glibc malloc"
    assert allocator_in_use() == expected
