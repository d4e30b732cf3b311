"""Signed webhooks: video.ready, video.failed, job.succeeded and job.failed, POSTed to the callback_url given
when the video or the question was submitted.

The event becomes due in the same Redis step as the status change that makes it (service/records.py), in
whichever process writes it, so a restart of the API or of a worker loses none. Every API process runs a
`Deliverer` thread; a Redis claim lets one of them attempt an event at a time, and an attempt a process did
not finish is due again after CLAIM_SECONDS. The event's body (id, type, created_at, and `data`: the
resource as GET returns it) is fixed at its first attempt: every attempt sends the same event id, signed
anew. Attempts: the first at once, then retries after `VIDEOQA_WEBHOOK_FIRST_RETRY_SECONDS` (default 5),
four times longer each time up to 8 hours: 9 attempts over about 15 hours; each one's outcome is on the
resource (`webhook`). Workers never deliver: a receiver that is down slows no indexing and no answer.

Signature, Stripe's scheme: `Videoqa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>"
keyed with VIDEOQA_WEBHOOK_SECRET>`; `verify` checks one as a receiver should.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time

import httpx
import redis

from service.contract import Settings
from service.errors import APIError
from service.records import Records
from service.schemas import JobPublic, VideoPublic
from service.url_guard import checked_target, parse_networks

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Videoqa-Signature"
MAX_ATTEMPTS = 9  # the first and 8 retries
BACKOFF_FACTOR, MAX_DELAY_S = 4, 8 * 3600
CLAIM_SECONDS = 60.0
DELIVERY_TIMEOUT_S = 10.0
POLL_S, BATCH = 0.5, 20
EVENT_TTL_S = 7 * 24 * 3600  # a finished event's body is kept this long

# Take a due event for one attempt: only while it is due (no other process took it). KEYS[1] due set;
# ARGV event, now, when the claim lapses.
_CLAIM = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The Videoqa-Signature header value of `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """Whether `header` signs `body` with `secret` within `tolerance_s` of `now`: what a receiver checks."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not parts.get("t", "").isdigit() or "v1" not in parts:
        return False
    timestamp = int(parts["t"])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature(secret, body, timestamp).partition(",v1=")[2]
    return hmac.compare_digest(expected, parts["v1"])


def retry_delay(attempts: int, first_retry_s: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return min(first_retry_s * BACKOFF_FACTOR ** (attempts - 1), MAX_DELAY_S)


def check_callback(url: str, settings: Settings) -> str:
    """A callback_url given at submission: refused now (400) when webhooks are off or the SSRF guard refuses
    it, before anything connects anywhere."""
    if not settings.webhook_secret:
        message = "callback_url needs VIDEOQA_WEBHOOK_SECRET set on the service"
        raise APIError(400, "webhooks_disabled", message, param="callback_url")
    try:
        checked_target(url, parse_networks(settings.url_allowed_networks))
    except APIError as exc:
        raise APIError(
            exc.status_code, exc.code, f"callback_url: {exc.message}", param="callback_url"
        ) from None
    return url


class Deliverer:
    """Attempts the due events, in a thread of each API process (`run`)."""

    def __init__(self, records: Records, settings: Settings) -> None:
        self.records, self.settings = records, settings
        self.client, self.keys = records.client, records.keys
        self._claim = self.client.register_script(_CLAIM)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(POLL_S):
            try:
                self.deliver_due()
            except redis.RedisError as exc:
                log.warning("webhook deliveries wait for redis: %s", exc)
            except Exception:  # a bug must not end the thread: the next poll tries again
                log.exception("webhook deliveries failed")

    def deliver_due(self) -> int:
        """One attempt of every event due now (that no other process took) -> how many."""
        now = time.time()
        attempted = 0
        for event in self.client.zrangebyscore(self.keys.webhooks_due(), "-inf", now, start=0, num=BATCH):
            if self._claim(keys=[self.keys.webhooks_due()], args=[event, now, now + CLAIM_SECONDS]):
                self._attempt(event)
                attempted += 1
        return attempted

    def _attempt(self, event: str) -> None:
        stored = self._stored(event)
        if stored is None:  # its resource was deleted before the first attempt
            self.client.zrem(self.keys.webhooks_due(), event)
            return
        body, attempts = stored["body"].encode(), int(stored["attempts"]) + 1
        ok, outcome = self._post(stored["url"], body)
        done = ok or attempts >= MAX_ATTEMPTS
        next_at = (
            None if done else time.time() + retry_delay(attempts, self.settings.webhook_first_retry_seconds)
        )
        with self.client.pipeline() as pipe:
            pipe.hset(self.keys.webhook_event(event), "attempts", attempts)
            if done:
                pipe.zrem(self.keys.webhooks_due(), event)
                pipe.expire(self.keys.webhook_event(event), EVENT_TTL_S)
            else:
                pipe.zadd(self.keys.webhooks_due(), {event: next_at})
            pipe.execute()
        kind, _, resource_id = event.partition("|")
        delivery = {"event_id": json.loads(body)["id"], "type": kind, "attempts": attempts, "delivered": ok,
                    "last_result": outcome, "next_attempt_at": next_at}  # fmt: skip
        update = self.records.update_video if kind.startswith("video.") else self.records.update_job
        update(resource_id, webhook=delivery)

    def _stored(self, event: str) -> dict | None:
        """The event's body, URL and attempts, built from its resource at the first attempt."""
        key = self.keys.webhook_event(event)
        if not self.client.exists(key):
            kind, _, resource_id = event.partition("|")
            video = kind.startswith("video.")
            record = self.records.get_video(resource_id) if video else self.records.get_job(resource_id)
            if record is None or not record.get("callback_url"):
                return None
            data = (VideoPublic if video else JobPublic).from_record(record).model_dump(mode="json")
            body = {"id": f"evt_{secrets.token_urlsafe(16)}", "type": kind, "created_at": int(time.time()),
                    "data": data}  # fmt: skip
            with self.client.pipeline() as pipe:  # HSETNX: a racing builder cannot change the event's id
                pipe.hsetnx(key, "body", json.dumps(body))
                pipe.hsetnx(key, "url", record["callback_url"])
                pipe.hsetnx(key, "attempts", 0)
                pipe.execute()
        return self.client.hgetall(key)

    def _post(self, url: str, body: bytes) -> tuple[bool, str]:
        """One POST, signed now, to the address the SSRF guard checks now -> (delivered, what happened)."""
        try:
            target = checked_target(url, parse_networks(self.settings.url_allowed_networks))
            with httpx.Client(timeout=DELIVERY_TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
                request = client.build_request("POST", content=body, **target.request_options())
                request.headers.update({
                    "Content-Type": "application/json", "User-Agent": "videoqa-webhooks",
                    SIGNATURE_HEADER: signature(self.settings.webhook_secret, body, int(time.time())),
                })  # fmt: skip
                response = client.send(request)
        except APIError as exc:
            return False, exc.code
        except (httpx.HTTPError, ValueError) as exc:  # no answer, or a URL httpx cannot send to
            return False, type(exc).__name__
        return 200 <= response.status_code < 300, str(response.status_code)
