"""The API tier stays small: importing the app pulls in neither torch, transformers nor worker code, and
connects to nothing (the Redis URL below points at a closed port)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import service.main
assert service.main.app.title == "videoqa"
banned = {"torch", "transformers", "worker", "av", "numpy"}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in banned)
assert not heavy, heavy
"""


def test_importing_the_app_imports_no_ml_and_connects_to_nothing(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "VIDEOQA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "VIDEOQA_DATA_DIR": str(tmp_path)}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
