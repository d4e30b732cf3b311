"""Which worker answers a follow-up: the one whose memory tier holds its video, with a load guard.

A follow-up answered from a worker's memory tier costs nothing to load; anywhere else its compressed cache is
read from the shared volume first (a 7B artifact is about 0.9 GB). So, with `routing = "affinity"`, an ask
about video V goes, in this order of preference, to:

1. `holder`: a live worker whose memory tier holds V's artifact (the least loaded of them, ties drawn);
2. `hash`: the worker rendezvous hashing of V over the live workers picks, so that one video's follow-ups
   gather on one worker, and a worker joining or leaving moves only its own share of the videos;
3. `guard`: the least loaded worker, when the one chosen above has a backlog (its private queue plus the tasks
   it runs) more than `routing_guard_tasks` above the least loaded one's and `routing_guard_ratio` times it
   (SGLang's cache-aware router applies the same two thresholds);
4. `shared`: the queue every worker takes from, with one worker or none alive, or `routing = "shared"`.

Workers publish what they hold (`Keys.worker_states`) and count the tasks they run (`Keys.worker_tasks`,
worker/serving/runtime.py); a state older than a heartbeat's lifetime is a dead worker's and is ignored.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import NamedTuple

import redis

from service.contract import GPU_QUEUE, Keys, Settings, worker_queue

LIVE_SECONDS = 30.0  # a worker state this old belongs to a dead worker (heartbeats come every 10 s)
REASONS = ("holder", "hash", "guard", "shared")


@dataclass(frozen=True)
class WorkerState:
    """What a worker last published: when, and the artifacts (keys) its memory tier holds."""

    at: float
    artifacts: frozenset[str]

    @classmethod
    def from_json(cls, text: str) -> WorkerState:
        data = json.loads(text)
        return cls(float(data["at"]), frozenset(data["artifacts"]))


class Route(NamedTuple):
    queue: str
    worker: str | None  # None: the shared queue
    reason: str  # one of REASONS


SHARED = Route(GPU_QUEUE, None, "shared")


def rendezvous(video: str, workers: list[str]) -> str:
    """The worker with the highest hash of (video, worker): stable while the workers stay, and when one
    leaves only the videos it had move (highest random weight hashing)."""

    def weight(worker: str) -> bytes:
        return hashlib.blake2b(f"{video}\0{worker}".encode(), digest_size=8).digest()

    return max(workers, key=weight)


def choose(video: str, backlogs: dict[str, int], holders: list[str], settings: Settings) -> Route:
    """The route of an ask about `video` given each live worker's backlog and the live workers holding it."""
    if settings.routing == "shared" or len(backlogs) < 2:
        return SHARED
    if holders:
        worker, reason = least_loaded(holders, backlogs), "holder"
    else:
        worker, reason = rendezvous(video, sorted(backlogs)), "hash"
    least = least_loaded(list(backlogs), backlogs)
    mine, fewest = backlogs[worker], backlogs[least]
    if mine - fewest > settings.routing_guard_tasks and mine > settings.routing_guard_ratio * fewest:
        worker, reason = least, "guard"
    return Route(worker_queue(worker), worker, reason)


def least_loaded(workers: list[str], backlogs: dict[str, int]) -> str:
    """The worker of `workers` with the shortest backlog; a random one of those tied, so that equally idle
    holders of a hot video share its asks rather than the first by name taking them all."""
    fewest = min(backlogs[worker] for worker in workers)
    return random.choice([worker for worker in workers if backlogs[worker] == fewest])


class Router:
    """Routes asks by the workers' published states, their own queues' lengths and their running tasks (two
    round trips to Redis per ask)."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings

    def route(self, video: str, artifact: str | None) -> Route:
        """The route of an ask about the video with id `video`, whose artifact key is `artifact` (None while
        it has none)."""
        if self.settings.routing == "shared":
            return SHARED
        states = live_states(self.client, self.keys)
        if len(states) < 2:
            return SHARED
        with self.client.pipeline(transaction=False) as pipe:
            for worker in states:
                pipe.llen(worker_queue(worker))
            pipe.hmget(self.keys.worker_tasks(), list(states))
            *queued, running = pipe.execute()
        backlogs = {
            worker: n + int(tasks or 0) for worker, n, tasks in zip(states, queued, running, strict=True)
        }
        holders = [worker for worker, state in states.items() if artifact in state.artifacts]
        return choose(video, backlogs, holders, self.settings)


def live_states(client: redis.Redis, keys: Keys, now: float | None = None) -> dict[str, WorkerState]:
    """The published state of every worker that wrote one in the last `LIVE_SECONDS`."""
    now = time.time() if now is None else now
    states = {}
    for worker, text in client.hgetall(keys.worker_states()).items():
        try:
            state = WorkerState.from_json(text)
        except (ValueError, KeyError, TypeError):
            continue  # not a state this version wrote
        if now - state.at < LIVE_SECONDS:
            states[worker] = state
    return states
