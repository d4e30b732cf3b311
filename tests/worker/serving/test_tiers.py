"""Cache tiers: memory LRU, the disk tier's Redis-indexed budget, promotion, corruption, single flight."""

import json
import threading
import time

import pytest
import redis

from service.contract import CacheTier, Keys
from tests.worker.engine.test_artifact import assert_same, make_artifact
from worker.engine.storage import ArtifactKey, get_or_build
from worker.serving.leases import LeaseKeeper
from worker.serving.tiers import DiskTier, MemoryStore, SingleFlight, TieredStore, get_or_build_shared

KEYS = Keys("test")


def key(n: int) -> ArtifactKey:
    return ArtifactKey(video_hash=f"{n:064x}", model_revision="local-tiny", settings_hash="ab" * 8)


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def disk_tier(tmp_path, client, budget_bytes: int = 10**9) -> DiskTier:
    return DiskTier(tmp_path / "artifacts", client, KEYS, budget_bytes)


def tiered(tmp_path, client, memory_bytes: int = 10**9, disk_bytes: int = 10**9) -> TieredStore:
    """A worker's view: its own memory tier over the shared disk tier."""
    return TieredStore(MemoryStore(memory_bytes), disk_tier(tmp_path, client, disk_bytes))


def lru(client) -> list[str]:
    return client.zrange(KEYS.artifact_lru(), 0, -1)


def test_memory_evicts_least_recently_used_by_bytes():
    a, b, c = (make_artifact(seed=i) for i in range(3))
    memory = MemoryStore(budget_bytes=int(2.5 * a.nbytes))
    memory.put(key(1), a)
    memory.put(key(2), b)
    assert memory.get(key(1)) is a  # key 1 is now the most recently used
    memory.put(key(3), c)
    assert memory.contains(key(1)) and memory.contains(key(3)) and not memory.contains(key(2))
    assert memory.nbytes == a.nbytes + c.nbytes <= memory.budget_bytes

    huge = make_artifact(lengths=(40, 40, 40))
    assert huge.nbytes > memory.budget_bytes
    memory.put(key(4), huge)  # larger than the whole budget: not kept, nothing evicted for it
    assert not memory.contains(key(4)) and set(memory.keys()) == {key(1), key(3)}
    assert MemoryStore(budget_bytes=0).put(key(1), a) == a.nbytes  # a disabled tier keeps nothing


def test_disk_tier_keeps_its_budget_through_the_redis_index(tmp_path, client):
    artifacts = [make_artifact(seed=i) for i in range(4)]
    probe = disk_tier(tmp_path / "probe", client)
    size = probe.put(key(99), artifacts[0])
    probe.delete(key(99))
    disk = disk_tier(tmp_path, client, budget_bytes=int(2.5 * size))

    assert disk.put(key(1), artifacts[0]) == size
    disk.put(key(2), artifacts[1])
    entry = {
        name: json.loads(value) for name, value in client.hgetall(KEYS.artifact(key(1).to_string())).items()
    }
    assert entry["bytes"] == size and entry["tier"] == "disk" and entry["created"] <= entry["last_used"]
    assert disk.total_bytes() == 2 * size
    time.sleep(0.01)
    assert disk.get(key(1)) is not None  # a read refreshes its last use: key 2 is now the oldest
    assert lru(client) == [key(2).to_string(), key(1).to_string()]

    disk.put(key(3), artifacts[2])
    assert not disk.contains(key(2)) and disk.contains(key(1)) and disk.contains(key(3))
    assert not client.exists(KEYS.artifact(key(2).to_string()))
    assert lru(client) == [key(1).to_string(), key(3).to_string()]
    assert disk.total_bytes() == 2 * size
    assert disk.get(key(2)) is None  # evicted: a plain miss, rebuilt by whoever asks next

    # An artifact being rebuilt (its single-flight lock held) is never evicted, nor the one just put.
    client.set(KEYS.lock(key(1).to_string()), "token")
    assert disk.put(key(4), artifacts[3]) == size
    assert disk.contains(key(1)) and disk.contains(key(4)) and not disk.contains(key(3))

    assert disk.delete(key(4)) and not disk.contains(key(4))
    assert disk.total_bytes() == size and lru(client) == [key(1).to_string()]


def test_a_disk_hit_is_promoted_to_memory_and_memory_hits_keep_the_disk_copy_warm(tmp_path, client):
    artifact = make_artifact()
    tiered(tmp_path, client).put(key(1), artifact)  # another worker built it

    store = tiered(tmp_path, client)
    found, tier = store.get_with_tier(key(1))
    assert tier == CacheTier.DISK
    assert_same(found, artifact)
    assert store.memory.contains(key(1))
    score = client.zscore(KEYS.artifact_lru(), key(1).to_string())
    time.sleep(0.01)
    again, tier = store.get_with_tier(key(1))
    assert tier == CacheTier.MEMORY and again is found
    assert client.zscore(KEYS.artifact_lru(), key(1).to_string()) > score
    assert store.get_with_tier(key(2)) == (None, CacheTier.NONE)

    assert store.delete(key(1))
    assert not store.contains(key(1)) and not client.exists(KEYS.artifact(key(1).to_string()))


def test_a_corrupted_disk_artifact_is_a_miss_and_is_rebuilt(tmp_path, client):
    built = []

    def build():
        built.append(1)
        return make_artifact(seed=7)

    get_or_build(tiered(tmp_path, client), key(1), build)
    (path,) = (tmp_path / "artifacts").rglob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))

    lock = SingleFlight(client, KEYS, keeper=LeaseKeeper(1.0), ttl=3, blocking_timeout=30)
    got = get_or_build(tiered(tmp_path, client), key(1), build, lock=lock)  # a worker without it in memory
    assert (
        not got.hit and got.tier == "none" and got.reason.startswith("corrupt") and "checksum" in got.reason
    )
    assert len(built) == 2
    got = get_or_build(tiered(tmp_path, client), key(1), build, lock=lock)
    assert got.hit and got.tier == CacheTier.DISK and len(built) == 2
    assert_same(got.artifact, make_artifact(seed=7))


def test_single_flight_builds_once_for_many_workers(tmp_path, redis_url):
    """Six workers (own Redis connection, own memory tier, shared disk) ask for the same key at once."""
    builds, waits, results = [], [], {}
    start = threading.Barrier(6)
    keeper = LeaseKeeper(1.0)

    def build():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for every other worker to find the lock taken
        return make_artifact(seed=3)

    def worker(n: int) -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        store = tiered(tmp_path, client)
        start.wait()
        results[n] = get_or_build_shared(
            store, client, KEYS, key(1), build, keeper=keeper, ttl=3, on_wait=lambda: waits.append(n)
        )
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 6
    assert len(builds) == 1
    builders = [got for got in results.values() if not got.hit]
    assert len(builders) == 1 and builders[0].reason == "absent" and not builders[0].waited
    readers = [got for got in results.values() if got.hit]
    assert all(got.waited and got.tier == CacheTier.DISK for got in readers)
    assert sorted(waits) == sorted(n for n, got in results.items() if got.hit)
    for got in results.values():
        assert_same(got.artifact, make_artifact(seed=3))
    assert not redis.Redis.from_url(redis_url).exists(KEYS.lock(key(1).to_string()))  # released
