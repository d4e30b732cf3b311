"""What one worker process holds: its settings, Redis and `Records`, the model (loaded once), the scheduler
that owns it and the cache tiers; plus the heartbeat that tells the API the worker is alive.

Celery tasks reach it through `current()`; tests build their own `WorkerRuntime(Settings(...))`. Nothing
here knows about Celery.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from service.contract import Settings
from service.records import Records
from worker.engine.adaretake import PRESETS, CompressionConfig
from worker.engine.checkpoint_settings import read_checkpoint_settings, with_settings
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.serving.leases import Lease, LeaseKeeper
from worker.serving.tiers import DiskTier, MemoryStore, SingleFlight, TieredStore

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0  # the API's /readyz wants a heartbeat younger than 30 s


def compression_config(settings: Settings) -> CompressionConfig:
    """The named preset (`worker.engine.adaretake.PRESETS`); ValueError naming the choices otherwise.
    Unless VIDEOQA_PRESET was set explicitly, what the checkpoint carries (`videoqa.json`) applies on top."""
    try:
        config = PRESETS[settings.preset]
    except KeyError:
        raise ValueError(
            f"unknown VIDEOQA_PRESET {settings.preset!r}: choose one of {sorted(PRESETS)}"
        ) from None
    if "preset" in settings.model_fields_set:
        return config
    return with_settings(config, read_checkpoint_settings(settings.model))


def scheduler_config(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        max_active=settings.scheduler_max_active,
        max_admit=settings.scheduler_max_admit,
        index_share=settings.scheduler_index_share,
        cache_bytes=settings.scheduler_cache_bytes,
    )


class WorkerRuntime:
    """One per worker process. The model and the tiers are created on first use (thread-safe), so building a
    runtime is cheap and a bad preset fails at once, before any model is loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.config = compression_config(settings)
        self.client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, health_check_interval=30
        )
        self.records = Records(self.client, self.keys)
        self._loaded = None
        self._store: TieredStore | None = None
        self._scheduler: Scheduler | None = None
        self._init_lock = threading.Lock()
        self.keeper = LeaseKeeper(interval=settings.lease_seconds / 3)
        self.name: str | None = None  # the Celery worker's name, once it has one

    @contextlib.contextmanager
    def running(self):
        """Counts a task in `Keys.worker_tasks` while inside: routing's load guard weighs this worker's
        backlog by it, so the count is written at once, not with the next heartbeat."""
        self._count_task(1)
        try:
            yield
        finally:
            self._count_task(-1)

    def _count_task(self, change: int) -> None:
        if self.name is None:
            return  # not a Celery worker: nobody routes to it
        try:
            self.client.hincrby(self.keys.worker_tasks(), self.name, change)
        except redis.RedisError as error:  # routing weighs a stale count; the task itself goes on
            logger.warning("could not count a task for routing: %s", error)

    def publish(self) -> None:
        """Write this worker's heartbeat and `state()` now (the memory tier changed): before the task that put
        an artifact there reports its job done, so the next ask about it is routed here."""
        if self.name is None:
            return  # not a Celery worker: nobody routes to it
        try:
            self.records.heartbeat(self.name, self.state())
        except redis.RedisError as error:
            logger.warning("could not publish what the memory tier holds: %s", error)

    def state(self) -> dict:
        """What routing needs of this worker (service/routing.py `WorkerState`): the keys of the artifacts its
        memory tier holds."""
        artifacts = sorted(key.to_string() for key in self._store.memory.keys()) if self._store else []
        return {"at": time.time(), "artifacts": artifacts}

    @property
    def loaded(self):
        """The `LoadedModel`, loaded on first use."""
        if self._loaded is None:
            with self._init_lock:
                if self._loaded is None:
                    from worker.engine.models import load_model

                    s = self.settings
                    loaded = load_model(s.model, dtype=s.dtype, device=s.device)
                    logger.info("model %s (%s) on %s, preset %s", loaded.name, loaded.revision, loaded.device,
                                s.preset)  # fmt: skip
                    self._loaded = loaded
        return self._loaded

    @property
    def store(self) -> TieredStore:
        """Memory (on the model's device) over the shared disk tier."""
        if self._store is None:
            device = self.loaded.device
            with self._init_lock:
                if self._store is None:
                    s = self.settings
                    self._store = TieredStore(
                        MemoryStore(s.memory_cache_bytes, device=device, on_change=self.publish),
                        DiskTier(s.artifacts_dir, self.client, self.keys, s.disk_cache_bytes, device=device),
                    )
        return self._store

    @property
    def scheduler(self) -> Scheduler:
        """The loop that owns the model: every task of this process submits its model work to it."""
        if self._scheduler is None:
            loaded = self.loaded
            with self._init_lock:
                if self._scheduler is None:
                    self._scheduler = Scheduler(loaded, scheduler_config(self.settings))
        return self._scheduler

    def single_flight(self, on_wait=None) -> SingleFlight:
        """The build lease for `get_or_compress`: one compression per artifact across all workers. A live
        builder is waited for as long as a task may run; a dead one's lease lapses within `lease_seconds`."""
        s = self.settings
        return SingleFlight(self.client, self.keys, keeper=self.keeper, ttl=s.lease_seconds,
                            blocking_timeout=s.task_time_limit, on_wait=on_wait)  # fmt: skip

    def job_lease(self, job_id: str) -> Lease:
        """The lease a worker holds while it runs `job_id` (the stale-job reaper looks for it)."""
        return Lease(self.client, self.keys.job_lease(job_id), self.keys.job_fence(job_id),
                     self.settings.lease_seconds)  # fmt: skip

    def warm_up(self) -> None:
        """Load the model and open the tiers now rather than in the first task."""
        _ = self.store, self.scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._store is not None:
            self._store.close()
        self.client.close()


class Heartbeat:
    """A daemon thread that records `name` as alive in Redis, with the worker's `state()` for routing, every
    `interval` seconds until stopped.

    Redis errors are logged and retried at the next beat: a short outage must not kill the worker."""

    def __init__(
        self,
        records: Records,
        name: str,
        state: Callable[[], dict],
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.records = records
        self.name = name
        self.state = state
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="videoqa-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.records.heartbeat(self.name, self.state())
            except redis.RedisError as error:
                logger.warning("heartbeat failed: %s", error)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop beating and remove the entry, so /readyz sees at once that this worker is gone."""
        self._stop.set()
        self._thread.join(timeout=self.interval)
        try:
            self.records.client.hdel(self.records.keys.workers(), self.name)
            self.records.client.hdel(self.records.keys.worker_states(), self.name)
            self.records.client.hdel(self.records.keys.worker_tasks(), self.name)
        except redis.RedisError as error:
            logger.warning("could not remove heartbeat of %s: %s", self.name, error)


_current: WorkerRuntime | None = None
_current_lock = threading.Lock()


def current() -> WorkerRuntime:
    """This process's runtime, from the VIDEOQA_* environment on first use."""
    global _current
    if _current is None:
        with _current_lock:
            if _current is None:
                _current = WorkerRuntime(Settings())
    return _current


def install(runtime: WorkerRuntime | None) -> None:
    """Use `runtime` as this process's (tests), or forget it (None)."""
    global _current
    with _current_lock:
        _current = runtime
