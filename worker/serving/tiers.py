"""Cache tiers behind the engine's `ArtifactStore` interface, and single flight across workers.

    MemoryStore   this process's LRU of ready artifacts, on the model's device, bounded in bytes
    DiskTier      the shared volume's `DiskStore`, bounded in bytes through an index in Redis
    TieredStore   memory, then disk (a disk hit is promoted to memory); reports which tier answered
    SingleFlight  a Redis lease per artifact key, so one worker compresses and the others wait and read

The Redis index is the one `service.records` maintains: per artifact a hash `Keys.artifact(key)` (bytes,
tier, created, last_used; JSON-encoded fields), the sorted set `Keys.artifact_lru()` scored by last use,
and the running total in `Keys.counter("artifact_bytes")["disk"]`. The API releases entries when the last
video using an artifact is deleted; this module adds them on put and removes them on eviction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import redis
import torch

from service.contract import CacheTier, Keys
from worker.engine.artifact import CompressedKV
from worker.engine.features import VisionFeatures
from worker.engine.storage import ArtifactKey, ArtifactStore, BuildLock, DiskStore, Obtained, get_or_build
from worker.serving.leases import Lease, LeaseKeeper

logger = logging.getLogger(__name__)


# ---- memory ------------------------------------------------------------------------------------------


class MemoryStore(ArtifactStore):
    """Ready artifacts in this process, least recently used evicted first once over `budget_bytes`.

    On a GPU worker `device` is the model's: a hit skips the host-to-device copy as well as the disk. An
    artifact larger than the whole budget is not kept. Thread-safe.

    Args:
        budget_bytes (int): most bytes of keys and values held (`CompressedKV.nbytes`); 0 disables the tier.
        device (str | torch.device): where held artifacts live; others are copied there on put.
        on_change (Callable[[], None]): called after an artifact came or went (the worker publishes what it
            holds, for routing).
    """

    tier = CacheTier.MEMORY.value

    def __init__(
        self,
        budget_bytes: int,
        device: str | torch.device = "cpu",
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.on_change = on_change
        self._items: OrderedDict[ArtifactKey, CompressedKV] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(artifact.nbytes for artifact in self._items.values())

    def put(self, key: ArtifactKey, artifact: CompressedKV) -> int:
        nbytes = artifact.nbytes
        if nbytes > self.budget_bytes:
            self.delete(key)  # never serve an older version of what was just replaced elsewhere
            return nbytes
        if not _on_device(artifact, self.device):
            artifact = artifact.to(self.device)
        with self._lock:
            self._items[key] = artifact
            self._items.move_to_end(key)
            total = sum(a.nbytes for a in self._items.values())
            while total > self.budget_bytes:
                oldest, evicted = next(iter(self._items.items()))
                del self._items[oldest]
                total -= evicted.nbytes
        self.on_change()
        return nbytes

    def get(self, key: ArtifactKey) -> CompressedKV | None:
        with self._lock:
            artifact = self._items.get(key)
            if artifact is not None:
                self._items.move_to_end(key)
            return artifact

    def contains(self, key: ArtifactKey) -> bool:
        with self._lock:
            return key in self._items

    def delete(self, key: ArtifactKey) -> bool:
        with self._lock:
            held = self._items.pop(key, None) is not None
        if held:
            self.on_change()
        return held

    def keys(self) -> Iterator[ArtifactKey]:
        with self._lock:
            return iter(list(self._items))

    def close(self) -> None:
        with self._lock:
            self._items.clear()


def _on_device(artifact: CompressedKV, device: torch.device) -> bool:
    def same(tensor: torch.Tensor) -> bool:
        return tensor.device.type == device.type and (
            device.index is None or tensor.device.index == device.index
        )

    return all(same(t) for t in (*artifact.keys, *artifact.values))


# ---- disk, with a byte budget kept in Redis -------------------------------------------------------------

# Add or refresh an index entry; the byte total moves by the change in size (a rebuilt artifact may differ).
# KEYS: index hash, LRU set, byte counter. ARGV: artifact key, bytes, now, tier (JSON-encoded like Records).
_INDEX = """
local old = redis.call('HGET', KEYS[1], 'bytes')
if not old then redis.call('HSET', KEYS[1], 'created', ARGV[3]) end
redis.call('HSET', KEYS[1], 'bytes', ARGV[2], 'tier', ARGV[4], 'last_used', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local delta = tonumber(ARGV[2]) - (old and tonumber(old) or 0)
if delta ~= 0 then redis.call('HINCRBYFLOAT', KEYS[3], 'disk', delta) end
return 1
"""

# Refresh last use of an indexed entry only (a memory hit keeps its disk copy from looking cold).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
return 1
"""

# Drop an entry for eviction; returns its bytes, or false when another process got there first.
_UNINDEX = """
redis.call('ZREM', KEYS[2], ARGV[1])
local old = redis.call('HGET', KEYS[1], 'bytes')
if not old then return false end
redis.call('DEL', KEYS[1])
redis.call('HINCRBYFLOAT', KEYS[3], 'disk', -tonumber(old))
return old
"""


class DiskTier(ArtifactStore):
    """A `DiskStore` on the volume every worker shares, kept under `budget_bytes` by evicting least recently
    used artifacts, across processes, through the Redis index.

    Never evicted: the artifact just put, and any artifact whose single-flight lease is held (being rebuilt
    right now). An evicted artifact is simply a miss for the next reader, which rebuilds it. Two workers
    evicting at once may together evict a little more than needed; never less.

    Args:
        root (Path): the artifacts directory (`Settings.artifacts_dir`).
        client (redis.Redis): for the index.
        keys (Keys): the deployment's Redis key layout.
        budget_bytes (int): most bytes of artifact files kept.
        device (str | torch.device): where `get` puts the tensors.
    """

    tier = CacheTier.DISK.value

    def __init__(
        self, root, client: redis.Redis, keys: Keys, budget_bytes: int, device: str | torch.device = "cpu"
    ) -> None:
        self.disk = DiskStore(root, device=device)
        self.client = client
        self.redis_keys = keys
        self.budget_bytes = budget_bytes
        self._index = client.register_script(_INDEX)
        self._touch = client.register_script(_TOUCH)
        self._unindex = client.register_script(_UNINDEX)

    def _index_keys(self, key: ArtifactKey) -> list[str]:
        name = key.to_string()
        return [
            self.redis_keys.artifact(name),
            self.redis_keys.artifact_lru(),
            self.redis_keys.counter("artifact_bytes"),
        ]

    def put(self, key: ArtifactKey, artifact: CompressedKV) -> int:
        nbytes = self.disk.put(key, artifact)
        # The budget counts the artifact and the vision features kept beside it (put just before).
        self._index(
            keys=self._index_keys(key), args=_args(key, nbytes + (self.disk.features_nbytes(key) or 0))
        )
        self.evict(protect={key})
        return nbytes

    def get(self, key: ArtifactKey) -> CompressedKV | None:
        artifact = self.disk.get(key)  # ArtifactError when damaged: the caller rebuilds and puts anew
        if artifact is not None:
            nbytes = self.disk.nbytes(key)
            if nbytes is not None:  # (re)index: also heals an index lost with a flushed Redis
                nbytes += self.disk.features_nbytes(key) or 0
                self._index(keys=self._index_keys(key), args=_args(key, nbytes))
        return artifact

    def put_features(self, key: ArtifactKey, features: VisionFeatures) -> int:
        return self.disk.put_features(key, features)

    def get_features(self, key: ArtifactKey) -> VisionFeatures | None:
        return self.disk.get_features(key)

    def touch(self, key: ArtifactKey) -> None:
        self._touch(keys=self._index_keys(key)[:2], args=[key.to_string(), json.dumps(time.time())])

    def contains(self, key: ArtifactKey) -> bool:
        return self.disk.contains(key)

    def delete(self, key: ArtifactKey) -> bool:
        self._unindex(keys=self._index_keys(key), args=[key.to_string()])
        return self.disk.delete(key)

    def keys(self) -> Iterator[ArtifactKey]:
        return self.disk.keys()

    def nbytes(self, key: ArtifactKey) -> int | None:
        """Size of the stored file, or None when there is none."""
        return self.disk.nbytes(key)

    def features_nbytes(self, key: ArtifactKey) -> int | None:
        """Size of the vision features kept beside it, or None when there are none."""
        return self.disk.features_nbytes(key)

    def total_bytes(self) -> float:
        return float(self.client.hget(self.redis_keys.counter("artifact_bytes"), "disk") or 0)

    def evict(self, protect: set[ArtifactKey] = frozenset()) -> list[ArtifactKey]:
        """Remove least recently used artifacts until the indexed bytes fit the budget -> the removed keys."""
        evicted: list[ArtifactKey] = []
        if self.total_bytes() <= self.budget_bytes:
            return evicted
        protected = {key.to_string() for key in protect}
        for name in self.client.zrange(self.redis_keys.artifact_lru(), 0, -1):  # oldest first
            name = name.decode() if isinstance(name, bytes) else name
            if name in protected or self.client.exists(self.redis_keys.lock(name)):
                continue
            try:
                key = ArtifactKey.from_string(name)
            except ValueError:  # not ours to interpret: drop it from the LRU only
                self.client.zrem(self.redis_keys.artifact_lru(), name)
                continue
            if self._unindex(keys=self._index_keys(key), args=[name]):
                self.disk.delete(key)
                evicted.append(key)
                logger.info("disk tier over budget: evicted %s", name)
            if self.total_bytes() <= self.budget_bytes:
                break
        return evicted


def _args(key: ArtifactKey, nbytes: int) -> list[str]:
    return [key.to_string(), json.dumps(nbytes), json.dumps(time.time()), json.dumps(CacheTier.DISK.value)]


# ---- both -----------------------------------------------------------------------------------------------


class TieredStore(ArtifactStore):
    """Memory first, then disk; what disk serves is promoted to memory. Puts go to both (disk first: it is
    what other workers see). `get_with_tier` says which tier answered."""

    def __init__(self, memory: MemoryStore, disk: DiskTier) -> None:
        self.memory = memory
        self.disk = disk

    def get_with_tier(self, key: ArtifactKey) -> tuple[CompressedKV | None, str]:
        artifact = self.memory.get(key)
        if artifact is not None:
            self.disk.touch(key)
            return artifact, CacheTier.MEMORY
        artifact = self.disk.get(key)  # ArtifactError propagates: a damaged artifact is a miss upstream
        if artifact is not None:
            self.memory.put(key, artifact)
            return artifact, CacheTier.DISK
        return None, CacheTier.NONE

    def get(self, key: ArtifactKey) -> CompressedKV | None:
        return self.get_with_tier(key)[0]

    def put(self, key: ArtifactKey, artifact: CompressedKV) -> int:
        nbytes = self.disk.put(key, artifact)
        self.memory.put(key, artifact)
        return nbytes

    def put_features(self, key: ArtifactKey, features: VisionFeatures) -> int:
        return self.disk.put_features(key, features)  # on disk only: they are read once per question

    def get_features(self, key: ArtifactKey) -> VisionFeatures | None:
        return self.disk.get_features(key)

    def contains(self, key: ArtifactKey) -> bool:
        return self.memory.contains(key) or self.disk.contains(key)

    def delete(self, key: ArtifactKey) -> bool:
        in_memory = self.memory.delete(key)
        return self.disk.delete(key) or in_memory

    def keys(self) -> Iterator[ArtifactKey]:
        return iter(sorted(set(self.memory.keys()) | set(self.disk.keys()), key=ArtifactKey.to_string))

    def close(self) -> None:
        self.memory.close()


# ---- single flight -------------------------------------------------------------------------------------


class SingleFlight:
    """A `BuildLock` for `get_or_build`: a lease per artifact key (`worker.serving.leases`), shared by every
    worker.

    The first caller takes the lease and builds, renewing it from `keeper`'s thread meanwhile; the others
    call `on_wait` once, then poll until it is free and read the artifact from the store. A builder that
    dies stops renewing, so its lease expires within `ttl` seconds and a waiter takes over the build. The
    lease's fencing token is checked before the result is stored (`get_or_build` calls `check`): a stale
    builder never overwrites what a newer one stored.

    Args:
        client (redis.Redis): the lease's Redis.
        keys (Keys): the deployment's Redis key layout (`Keys.lock`, `Keys.fence`).
        keeper (LeaseKeeper): renews the lease while the build runs.
        ttl (float): seconds the lease outlives its holder's last renewal.
        blocking_timeout (float): most seconds to wait for a live holder; then build anyway, unfenced
            (duplicated work is safe: writes are atomic and equal).
        on_wait (Callable[[], None] | None): called when another worker holds the lease.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        keeper: LeaseKeeper,
        ttl: float,
        blocking_timeout: float,
        on_wait: Callable[[], None] | None = None,
        poll_seconds: float = 0.1,
    ) -> None:
        self.client = client
        self.redis_keys = keys
        self.keeper = keeper
        self.ttl = ttl
        self.blocking_timeout = blocking_timeout
        self.on_wait = on_wait
        self.poll_seconds = poll_seconds

    @contextlib.contextmanager
    def __call__(self, key: ArtifactKey) -> Iterator[Lease]:
        name = key.to_string()
        lease = Lease(self.client, self.redis_keys.lock(name), self.redis_keys.fence(name), self.ttl)
        held = lease.acquire()
        if not held:
            lease.waited = True
            if self.on_wait is not None:
                self.on_wait()
            deadline = time.monotonic() + self.blocking_timeout
            while not (held := lease.acquire()) and time.monotonic() < deadline:
                time.sleep(self.poll_seconds)
            if not held:
                logger.warning("waited %ss for %s; building it without the lease", self.blocking_timeout, key)
        if held:
            self.keeper.add(lease)
        try:
            yield lease
        finally:
            if held:
                self.keeper.discard(lease)
                lease.release()


def get_or_build_shared(
    store: ArtifactStore,
    client: redis.Redis,
    keys: Keys,
    key: ArtifactKey,
    build: Callable[[], CompressedKV],
    *,
    keeper: LeaseKeeper,
    ttl: float,
    blocking_timeout: float = 3600,
    on_wait: Callable[[], None] | None = None,
) -> Obtained:
    """`worker.engine.storage.get_or_build` with a `SingleFlight` lease: across workers sharing `client`, one
    builds the key and the rest read its result."""
    lock: BuildLock = SingleFlight(
        client, keys, keeper=keeper, ttl=ttl, blocking_timeout=blocking_timeout, on_wait=on_wait
    )
    return get_or_build(store, key, build, lock=lock)
