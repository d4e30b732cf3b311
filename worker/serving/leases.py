"""Leases in Redis: locks that live only while their holder renews them, with a fencing token.

    Lease         one named lease: acquire (-> a fencing token), renew, release, `check` that no newer
                  holder exists
    LeaseKeeper   a daemon thread renewing every lease this process holds, every third of their time to live

A lease key holds its holder's token and expires `ttl` seconds after the last renewal, so the work of a
holder that died (SIGKILL, a lost machine) is free again within `ttl`, not after a task's time limit. Every
acquisition takes the next value of the lease's fence counter (INCR): a holder that was paused past its
lease, or cut off from Redis, finds that a newer token exists and must not write its result over the newer
holder's (`check` raises `LeaseLost`).

When Redis lost the lease key (a restart without it) but the fence counter still holds this holder's token,
nobody else took over: renewal takes the key again instead of giving up work in progress.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

logger = logging.getLogger(__name__)

FENCE_TTL_S = 7 * 24 * 3600  # a fence counter outlives any holder; idle ones are dropped after a week

# KEYS: lease, fence. ARGV: ttl ms, fence ttl s. -> the new token, or 0 when someone holds the lease.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""

# KEYS: lease, fence. ARGV: token, ttl ms. -> 1 renewed, 0 lost to a newer holder.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not held and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token. Deletes the lease only while it is still this holder's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """A newer holder took the lease over: this holder's result must not be written."""


class Lease:
    """One lease (`key`) and its fence counter (`fence_key`), held for `ttl` seconds per renewal.

    Args:
        client (redis.Redis): the lease's Redis.
        key (str): the lease key; its value is the holder's token.
        fence_key (str): the counter that hands out tokens.
        ttl (float): seconds the lease outlives its holder's last renewal.
    """

    def __init__(self, client: redis.Redis, key: str, fence_key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.fence_key = fence_key
        self.ttl = ttl
        self.token: int | None = None
        self.waited = False  # another holder had it first (set by whoever waited)
        self.lost = False
        self.renewed_at = 0.0  # time.monotonic() of the last acquisition or renewal

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True with a new `token`."""
        token = self.client.eval(_ACQUIRE, 2, self.key, self.fence_key, self._ttl_ms, FENCE_TTL_S)
        if not token:
            return False
        self.token, self.lost, self.renewed_at = int(token), False, time.monotonic()
        return True

    def renew(self) -> bool:
        """Extend the lease by `ttl`; False (and `lost`) when a newer holder has it."""
        if self.token is None:
            return False
        renewed = bool(self.client.eval(_RENEW, 2, self.key, self.fence_key, self.token, self._ttl_ms))
        if renewed:
            self.renewed_at = time.monotonic()
        elif not self.lost:
            self.lost = True
            logger.warning("lease %s (token %s) was taken over by a newer holder", self.key, self.token)
        return renewed

    def release(self) -> None:
        """Give the lease up now (when still this holder's). Redis errors are logged: it expires anyway."""
        if self.token is None:
            return
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError as error:
            logger.warning("could not release lease %s: %s (it expires within %.0f s)", self.key, error,
                           self.ttl)  # fmt: skip
        self.token = None

    def may_have_lapsed(self) -> bool:
        """Lost, or not renewed for its whole time to live (this process was paused or cut off): another
        holder may have it by now, and `check` asks Redis."""
        return self.lost or time.monotonic() - self.renewed_at >= self.ttl

    def check(self) -> None:
        """Raise LeaseLost when a token newer than this holder's was handed out (none held: no check)."""
        if self.token is None:
            return
        current = self.client.get(self.fence_key)
        if current is None or int(current) != self.token:
            raise LeaseLost(f"{self.key}: token {self.token} superseded by {current}")

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))


class LeaseKeeper:
    """Renews every held lease every `interval` seconds from one daemon thread (started on first `add`).

    A Redis error only delays a renewal to the next beat: the lease expires if its holder stays cut off
    for its whole time to live, and renewal takes it back if nobody else did meanwhile (see `Lease`)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._leases: set[Lease] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="videoqa-leases", daemon=True)
                self._thread.start()

    def discard(self, lease: Lease) -> None:
        with self._lock:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                leases = list(self._leases)
            for lease in leases:
                try:
                    lease.renew()
                except redis.RedisError as error:
                    logger.warning("could not renew lease %s: %s", lease.key, error)
