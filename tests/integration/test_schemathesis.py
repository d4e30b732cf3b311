"""schemathesis against the live API (uvicorn, a real Redis) with the committed openapi.yaml: every
generated request, valid and invalid, must get no 5xx and a response the document describes.

Bounded and reproducible: a fixed seed, 20 examples per operation, no shrinking, one worker (Hypothesis
describes its strategies through ast.parse, which is not thread-safe on CPython 3.11: with two workers the
/v1 chat body's nested schemas fail at random with "SystemError: AST constructor recursion depth
mismatch"). Checks: all but
`positive_data_acceptance`, which expects every schema-valid request to succeed, while the API also judges
what JSON Schema cannot say (an upload's bytes must be a video container, a question must not be blank).
A heartbeat plays the worker's part, so that /readyz answers 200 as in a running deployment.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.contract import Keys
from service.openapi import DEFAULT_PATH
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow

KEY = "schemathesis-key-0123456789"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(redis_url, tmp_path):
    logs = tmp_path / "logs"
    stack = Stack(redis_url, tmp_path / "data", tmp_path / "no-model", logs, api_keys=f"{KEY}:st")
    logs.mkdir()
    beating = threading.Event()

    def heartbeat():
        while not beating.wait(5):
            stack.redis.hset(Keys().workers(), "schemathesis", time.time())

    stack.redis.hset(Keys().workers(), "schemathesis", time.time())
    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        stack.start_api()
        result = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "run", str(DEFAULT_PATH), "--url", stack.base_url,
             "--header", f"Authorization: Bearer {KEY}", "--checks", "all",
             "--exclude-checks", "positive_data_acceptance", "--seed", "42", "--max-examples", "20",
             "--phases", "examples,coverage,fuzzing", "--no-shrink", "--workers", "1",
             "--request-timeout", "30"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        beating.set()
        stack.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
