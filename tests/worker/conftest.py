"""Fixtures of the worker's task tests: settings for a private Redis and a tiny model, and a runtime."""

import pytest

from service.contract import Settings
from worker.serving.runtime import WorkerRuntime


@pytest.fixture
def settings(redis_url, tmp_path, tiny_models) -> Settings:
    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        model=str(tiny_models["qwen2_5_vl"]),
        preset="tiny",
        device="cpu",
        dtype="float32",
    )


@pytest.fixture
def rt(settings):
    runtime = WorkerRuntime(settings)
    yield runtime
    runtime.close()
