"""The API against the test's own redis-server, through FastAPI's TestClient (in-process HTTP)."""

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import redis
from fastapi.testclient import TestClient

from service.contract import Settings
from service.main import create_app
from service.records import Records

ALICE_KEY, BOB_KEY = "alice-key-0123456789", "bob-key-0123456789ab"
ALICE, BOB = {"Authorization": f"Bearer {ALICE_KEY}"}, {"Authorization": f"Bearer {BOB_KEY}"}


@pytest.fixture
def settings(redis_url, tmp_path) -> Settings:
    return Settings(redis_url=redis_url, data_dir=tmp_path / "data", key_prefix="vqa")


@pytest.fixture
def make_client(settings) -> Iterator[Callable[..., TestClient]]:
    """make_client(**setting overrides) -> a started TestClient; all are closed after the test."""
    with ExitStack() as stack:

        def make(**overrides) -> TestClient:
            app = create_app(settings.model_copy(update=overrides))
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def tenants_client(make_client) -> TestClient:
    """Two tenants: ALICE and BOB headers."""
    return make_client(api_keys=f"{ALICE_KEY}:alice,{BOB_KEY}:bob")


@pytest.fixture
def records(settings) -> Iterator[Records]:
    """The same store the app uses, to play the worker's part."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield Records(client, settings.keys)
    client.close()
