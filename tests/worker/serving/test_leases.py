"""Leases against a real Redis: renewed while held, free within their time to live once the holder stops,
and fenced, so that a holder that lapsed can neither renew nor store over a newer one."""

import threading
import time

import pytest
import redis

from service.contract import Keys
from tests.worker.engine.test_artifact import assert_same, make_artifact
from tests.worker.serving.test_tiers import key, tiered
from worker.engine.storage import get_or_build
from worker.serving.leases import Lease, LeaseKeeper, LeaseLost
from worker.serving.tiers import SingleFlight

KEYS = Keys("test")


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def lease(client, ttl: float = 0.5) -> Lease:
    return Lease(client, KEYS.lock("k"), KEYS.fence("k"), ttl)


def test_tokens_grow_and_only_the_holder_renews_or_releases(client):
    first, second = lease(client), lease(client)
    assert first.acquire() and first.token == 1
    assert not second.acquire()  # held
    first.release()
    assert second.acquire() and second.token == 2
    first.token = 1  # a holder that lapsed and did not notice
    assert not first.renew() and first.lost
    with pytest.raises(LeaseLost):
        first.check()
    first.release()  # not its lease any more: a no-op
    assert client.get(KEYS.lock("k")) == "2"
    second.check()


def test_a_kept_lease_outlives_its_ttl_and_one_not_renewed_lapses_within_it(client):
    keeper = LeaseKeeper(interval=0.1)
    held = lease(client, ttl=0.4)
    assert held.acquire()
    keeper.add(held)
    time.sleep(1.2)  # three times its ttl
    assert not lease(client).acquire()
    keeper.discard(held)  # the holder "dies": nobody renews it
    time.sleep(0.5)
    assert lease(client).acquire()


def test_renewal_takes_back_a_lease_redis_lost_while_nobody_else_took_it(client):
    held = lease(client, ttl=5)
    assert held.acquire()
    client.delete(KEYS.lock("k"))  # a Redis restart without the key (the fence counter survived)
    assert held.renew() and client.get(KEYS.lock("k")) == str(held.token)
    client.delete(KEYS.lock("k"))
    assert lease(client).acquire()  # someone else first: now the old holder has lost it
    assert not held.renew()


def test_a_dead_builder_blocks_its_key_for_one_ttl_then_a_waiter_builds(tmp_path, client):
    dead = Lease(client, KEYS.lock(key(1).to_string()), KEYS.fence(key(1).to_string()), ttl=1.0)
    assert dead.acquire()  # took the lease, then died: never renewed, never released
    waits = []
    lock = SingleFlight(client, KEYS, keeper=LeaseKeeper(0.3), ttl=1.0, blocking_timeout=30,
                        on_wait=lambda: waits.append(1))  # fmt: skip
    started = time.monotonic()
    got = get_or_build(tiered(tmp_path, client), key(1), lambda: make_artifact(seed=1), lock=lock)
    waited = time.monotonic() - started
    assert not got.hit and got.waited and waits == [1]
    assert waited < 3.0  # one ttl, not a task time limit
    assert not client.exists(KEYS.lock(key(1).to_string()))  # released by the builder


def test_a_stale_builder_does_not_store_over_the_newer_one(tmp_path, client):
    """Builder A's lease lapses mid-build (paused, cut off); B takes over, builds and stores. A must not
    overwrite B's artifact when it resumes: its put is refused by the fencing token."""
    # A's keeper never gets to renew: A is as good as paused past its ttl while it builds.
    paused = SingleFlight(client, KEYS, keeper=LeaseKeeper(interval=3600), ttl=0.5, blocking_timeout=30)
    live = SingleFlight(client, KEYS, keeper=LeaseKeeper(interval=0.1), ttl=0.5, blocking_timeout=30)
    a_building, b_done = threading.Event(), threading.Event()
    outcome = {}

    def build_a():
        a_building.set()
        b_done.wait(10)
        return make_artifact(seed=1)

    def run_a():
        try:
            outcome["a"] = get_or_build(tiered(tmp_path, client), key(1), build_a, lock=paused)
        except LeaseLost as error:
            outcome["a"] = error

    thread = threading.Thread(target=run_a)
    thread.start()
    a_building.wait(10)
    time.sleep(0.6)  # A's lease lapses
    b = get_or_build(tiered(tmp_path, client), key(1), lambda: make_artifact(seed=2), lock=live)
    b_done.set()
    thread.join(10)
    assert not b.hit
    assert isinstance(outcome["a"], LeaseLost)
    assert_same(tiered(tmp_path, client).disk.get(key(1)), make_artifact(seed=2))  # B's result stands
