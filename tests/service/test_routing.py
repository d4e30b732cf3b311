"""Routing asks to the worker that holds their video: the choice (holder, rendezvous hash, load guard,
shared), read from what workers publish in a real Redis, and the reaper handing a dead worker's queue back."""

import time
from collections import Counter

import pytest

from service.contract import GPU_QUEUE, worker_queue
from service.queue import TaskQueue
from service.recovery import Reaper
from service.routing import LIVE_SECONDS, Router, choose, rendezvous

VIDEOS = [f"{n:064x}" for n in range(2000)]


def test_rendezvous_moves_only_the_share_of_a_worker_that_joins_or_leaves():
    three = ["w0", "w1", "w2"]
    before = {video: rendezvous(video, three) for video in VIDEOS}
    assert {w: sum(1 for x in before.values() if x == w) for w in three} == pytest.approx(
        {w: len(VIDEOS) / 3 for w in three}, rel=0.1
    )  # an even spread
    joined = {video: rendezvous(video, [*three, "w3"]) for video in VIDEOS}
    moved = [video for video in VIDEOS if joined[video] != before[video]]
    assert all(joined[video] == "w3" for video in moved)  # only to the newcomer
    assert len(moved) == pytest.approx(len(VIDEOS) / 4, rel=0.15)
    left = {video: rendezvous(video, ["w0", "w2"]) for video in VIDEOS}
    assert all(left[video] == before[video] for video in VIDEOS if before[video] != "w1")  # only w1's move


def test_holder_then_hash_then_shared(settings):
    backlogs = {"w0": 2, "w1": 0, "w2": 1}  # no backlog past the guard
    assert choose("v", backlogs, ["w0", "w2"], settings)[1:] == ("w2", "holder")  # the least loaded holder
    hashed = choose("v", backlogs, [], settings)
    assert hashed == (worker_queue(hashed.worker), rendezvous("v", sorted(backlogs)), "hash")
    assert choose("v", {"w0": 0}, ["w0"], settings) == (GPU_QUEUE, None, "shared")  # one worker: as before
    shared = settings.model_copy(update={"routing": "shared"})
    assert choose("v", backlogs, ["w0"], shared) == (GPU_QUEUE, None, "shared")


def test_equally_loaded_holders_share_a_hot_video(settings):
    backlogs = {"w0": 1, "w1": 1, "w2": 0}
    picks = Counter(choose("v", backlogs, ["w0", "w1"], settings).worker for _ in range(400))
    assert set(picks) == {"w0", "w1"} and min(picks.values()) > 150


def test_the_guard_needs_both_thresholds(settings):
    guard = settings.model_copy(update={"routing_guard_tasks": 8, "routing_guard_ratio": 1.5})
    assert choose("v", {"w0": 9, "w1": 0}, ["w0"], guard)[1:] == ("w1", "guard")  # 9 over, 9 > 1.5 x 0
    assert choose("v", {"w0": 8, "w1": 0}, ["w0"], guard)[1:] == ("w0", "holder")  # not more than 8 over
    assert choose("v", {"w0": 29, "w1": 20}, ["w0"], guard)[1:] == ("w0", "holder")  # 9 over, but < 1.5 x
    assert choose("v", {"w0": 31, "w1": 20}, ["w0"], guard)[1:] == ("w1", "guard")


def test_the_router_reads_published_states_and_queue_lengths(settings, records):
    client, keys = records.client, records.keys
    records.heartbeat("w0", {"at": time.time(), "artifacts": ["aa"]})
    records.heartbeat("w1", {"at": time.time(), "artifacts": []})
    client.hset(keys.worker_tasks(), "w1", 2)
    records.heartbeat("gone", {"at": time.time() - LIVE_SECONDS - 1, "artifacts": ["aa", "bb"]})
    router = Router(client, keys, settings)
    assert router.route("video-a", "aa")[1:] == ("w0", "holder")
    hashed = (rendezvous("video-b", ["w0", "w1"]), "hash")
    assert router.route("video-b", "bb")[1:] == hashed  # a dead holder is no holder
    client.lpush(worker_queue("w0"), *["message"] * 11)  # a backlog of 11 against w1's 2 running
    assert router.route("video-a", "aa")[1:] == ("w1", "guard")
    records.heartbeat("w1", {"at": time.time(), "artifacts": ["aa"]})
    assert router.route("video-a", "aa")[1:] == ("w1", "holder")


def test_a_dead_workers_queue_goes_back_to_the_shared_one_oldest_first(settings, records):
    client, keys = records.client, records.keys
    queue = TaskQueue(settings)
    try:
        records.heartbeat("alive", {"at": time.time(), "artifacts": []})
        records.heartbeat("dead", {"at": time.time() - LIVE_SECONDS - 1, "artifacts": []})
        for n in range(3):  # kombu pushes on the left
            client.lpush(worker_queue("dead"), f"dead-{n}")
            client.lpush(worker_queue("alive"), f"alive-{n}")
        client.lpush(GPU_QUEUE, "shared-0")
        Reaper(records, queue, settings).sweep()
        # in the order workers take them (from the right): the dead worker's, which waited longer, in their
        # own order, before the shared queue's
        assert client.lrange(GPU_QUEUE, 0, -1)[::-1] == ["dead-0", "dead-1", "dead-2", "shared-0"]
        assert client.llen(worker_queue("alive")) == 3 and client.llen(worker_queue("dead")) == 0
        assert client.hkeys(keys.worker_states()) == ["alive"]
    finally:
        queue.close()
