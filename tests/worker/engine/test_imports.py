"""The engine is usable without the service: importing every engine module pulls in no Celery, Redis,
FastAPI, the API tier or the worker's Celery plumbing."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import worker.engine

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
banned = {"celery", "kombu", "redis", "fastapi", "starlette", "uvicorn", "service"}
leaked = sorted(m for m in sys.modules if m.split(".")[0] in banned)
plumbing = sorted(m for m in sys.modules if m.startswith("worker.") and not m.startswith("worker.engine"))
assert not leaked and not plumbing, (leaked, plumbing)
"""


def engine_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(worker.engine.__path__, "worker.engine.")]


def test_engine_has_its_modules():
    names = {name.rsplit(".", 1)[1] for name in engine_modules()}
    assert {"decode", "preprocess", "vision", "models", "generate", "answer", "adaretake", "engine",
            "artifact", "storage"} <= names  # fmt: skip


def test_engine_imports_no_service_plumbing():
    result = subprocess.run([sys.executable, "-c", PROBE, *engine_modules()], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
