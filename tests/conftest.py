from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Qwen2.5-VL and Qwen2-VL checkpoints, built once per test session."""
    from worker.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))
