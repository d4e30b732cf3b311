"""The one Redis repository both tiers use: video and job records, job event streams, heartbeats, counters.

Torch-free and FastAPI-free: the API and the workers import it alike. Every hash field is stored
JSON-encoded, so types round-trip (None, bools, floats, lists, dicts); reads return decoded dicts.

Status gauges: the hashes `Keys.counter("videos")` and `Keys.counter("jobs")` hold how many records are
in each status. They are maintained atomically on create, on every status change and on delete, so
/metrics reads them in one HGETALL instead of scanning every record.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from service.contract import TERMINAL_JOB_STATES, JobStatus, Keys, VideoStatus

EVENT_STREAM_MAXLEN = 10_000

# HSET the fields only if the hash still exists (a deleted record must never be resurrected by a late
# update), keep the status gauge right when "status" changes, register the video as a user of the
# artifact when "artifact_key" is set, and when the status changes to one a webhook reports and the record
# has a callback_url, make that event due (in the same step as the change: no state change without its
# event, whichever process writes it). KEYS[1] record hash, KEYS[2] status counter hash, KEYS[3] artifact
# users set (or KEYS[1] when none), KEYS[4] the due webhook events; ARGV[1] new status JSON or "", ARGV[2]
# the id to add to KEYS[3] or "", ARGV[3] the event ("<type>|<id>") this status is or "", ARGV[4] now,
# ARGV[5:] field/value pairs.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then
  local old = redis.call('HGET', KEYS[1], 'status')
  if old and old ~= ARGV[1] then
    redis.call('HINCRBY', KEYS[2], cjson.decode(old), -1)
    redis.call('HINCRBY', KEYS[2], cjson.decode(ARGV[1]), 1)
    local callback = redis.call('HGET', KEYS[1], 'callback_url')
    if ARGV[3] ~= '' and callback and callback ~= 'null' then
      redis.call('ZADD', KEYS[4], 'NX', ARGV[4], ARGV[3])
    end
  end
end
if ARGV[2] ~= '' then redis.call('SADD', KEYS[3], ARGV[2]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
return 1
"""

# The statuses webhooks report, and their event types.
VIDEO_EVENTS = {VideoStatus.READY: "video.ready", VideoStatus.FAILED: "video.failed"}
JOB_EVENTS = {JobStatus.SUCCEEDED: "job.succeeded", JobStatus.FAILED: "job.failed"}

# The record, only when it belongs to the tenant: the check happens in Redis, before anything is sent back
# or decoded, so another tenant's id and no id at all cost the same. KEYS[1] record; ARGV[1] tenant JSON.
_GET_OWNED = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return {} end
return redis.call('HGETALL', KEYS[1])
"""

# XADD only while the job exists, so an event for a deleted job leaves no stream behind.
# KEYS[1] job hash, KEYS[2] event stream; ARGV maxlen, kind, data.
_APPEND_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'kind', ARGV[2], 'data', ARGV[3])
"""


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    return {name: json.loads(value) for name, value in raw.items()}


def decode_events(response: Any) -> list[tuple[str, str, dict]]:
    """An XREAD reply ([[stream, [(id, fields)]]], RESP2, decoded) -> [(id, kind, data)]. Sync and async."""
    return [
        (event_id, fields["kind"], json.loads(fields["data"]))
        for _, entries in response or []
        for event_id, fields in entries
    ]


class Records:
    """Video and job records, event streams, worker heartbeats and shared counters in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client  # created with decode_responses=True
        self.keys = keys
        self._update_script = client.register_script(_UPDATE_IF_EXISTS)
        self._append_script = client.register_script(_APPEND_IF_EXISTS)
        self._get_owned_script = client.register_script(_GET_OWNED)

    # ---- videos -----------------------------------------------------------------------------------

    def create_video(
        self,
        *,
        tenant: str,
        sha256: str,
        filename: str,
        size_bytes: int,
        path: str,
        container: str,
        video_id: str | None = None,
    ) -> tuple[dict, bool]:
        """-> (record, created). The tenant's live video with these bytes is returned instead of a new one.

        Live means present and not failed: uploading the bytes of a failed video again is how a client
        retries, so it creates a new video. Atomic under concurrency (WATCH on the tenant's sha key).
        `video_id` lets the caller name the final upload path before the record exists.
        """
        sha_key = self.keys.tenant_sha(tenant, sha256)
        video_id = video_id or new_id("vid")
        now = time.time()
        record = {
            "id": video_id, "tenant": tenant, "sha256": sha256, "filename": filename,
            "size_bytes": size_bytes, "path": path, "container": container,
            "status": VideoStatus.QUEUED.value, "stage": "queued", "progress": 0.0,
            "duration": None, "frames": None, "damaged_seconds": None, "tokens_before": None,
            "tokens_after": None, "artifact_bytes": None, "cache_tier": None, "artifact_key": None,
            "index_job_id": None,
            "error_code": None, "error_message": None, "created_at": now, "updated_at": now,
        }  # fmt: skip
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(sha_key)
                    existing_id = pipe.get(sha_key)
                    if existing_id is not None:
                        existing = self.get_video(existing_id)
                        if existing is not None and existing["status"] != VideoStatus.FAILED:
                            pipe.unwatch()
                            return existing, False
                    pipe.multi()
                    pipe.set(sha_key, video_id)
                    pipe.hset(self.keys.video(video_id), mapping=_encode(record))
                    pipe.zadd(self.keys.tenant_videos(tenant), {video_id: now})
                    pipe.hincrby(self.keys.counter("videos"), VideoStatus.QUEUED.value, 1)
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue  # another upload of the same bytes won the race: read its video

    def create_download(
        self, *, tenant: str, url: str, filename: str, deadline: float, **fields: Any
    ) -> dict:
        """A video given by URL, `downloading` until its bytes arrive (`update_video` then sets its sha256,
        size, path and container) or `deadline` (unix seconds) passes. Not deduplicated: its bytes are not
        known yet (their compressed cache is shared all the same, keyed by content)."""
        video_id, now = new_id("vid"), time.time()
        record = {
            "id": video_id, "tenant": tenant, "sha256": "", "filename": filename, "size_bytes": 0, "path": "",
            "container": "", "url": url, "status": VideoStatus.DOWNLOADING.value, "stage": "downloading",
            "progress": 0.0, "duration": None, "frames": None, "damaged_seconds": None, "tokens_before": None,
            "tokens_after": None, "artifact_bytes": None, "cache_tier": None, "artifact_key": None,
            "index_job_id": None, "error_code": None, "error_message": None, "created_at": now,
            "updated_at": now, **fields,
        }  # fmt: skip
        with self.client.pipeline() as pipe:
            pipe.hset(self.keys.video(video_id), mapping=_encode(record))
            pipe.zadd(self.keys.tenant_videos(tenant), {video_id: now})
            pipe.hincrby(self.keys.counter("videos"), VideoStatus.DOWNLOADING.value, 1)
            pipe.zadd(self.keys.downloads(), {video_id: deadline})
            pipe.execute()
        return record

    def get_video(self, video_id: str, tenant: str | None = None) -> dict | None:
        """The video, or None when absent or owned by another tenant (tenant=None: no check, for workers)."""
        return self._get(self.keys.video(video_id), tenant)

    def update_video(self, video_id: str, **fields: Any) -> bool:
        """Set fields (and updated_at). False, and nothing written, when the video was deleted.

        Setting `artifact_key` also adds the video to `Keys.artifact_users(artifact_key)`, atomically: the
        API deletes an artifact file only when the last video using it is deleted.
        """
        users_key = None
        if fields.get("artifact_key"):
            users_key = self.keys.artifact_users(fields["artifact_key"])
        return self._update(
            self.keys.video(video_id), self.keys.counter("videos"), fields, users_key, video_id,
            event=_event(VIDEO_EVENTS, fields, video_id),
        )  # fmt: skip

    def list_videos(self, tenant: str, *, offset: int, limit: int) -> tuple[list[dict], int]:
        """The tenant's videos, newest first, and how many the tenant has in all."""
        index = self.keys.tenant_videos(tenant)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zrevrange(index, offset, offset + limit - 1)
            pipe.zcard(index)
            ids, total = pipe.execute()
        if not ids:
            return [], total
        with self.client.pipeline(transaction=False) as pipe:
            for video_id in ids:
                pipe.hgetall(self.keys.video(video_id))
            raws = pipe.execute()
        return [_decode(raw) for raw in raws if raw], total

    def video_rank(self, tenant: str, video_id: str) -> int | None:
        """The video's place in `list_videos` (0: the newest), or None when the tenant has no such video."""
        return self.client.zrevrank(self.keys.tenant_videos(tenant), video_id)

    def delete_video(self, video_id: str) -> dict | None:
        """Remove the video, its dedupe and listing entries, its jobs and their event streams, atomically.

        Returns the deleted record (the caller removes the upload file and releases the artifact), or None
        when there was nothing to delete.
        """
        video_key, jobs_key = self.keys.video(video_id), self.keys.video_jobs(video_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(video_key, jobs_key)
                    raw = pipe.hgetall(video_key)
                    if not raw:
                        pipe.unwatch()
                        return None
                    record = _decode(raw)
                    job_ids = sorted(pipe.smembers(jobs_key))
                    job_keys = [self.keys.job(job_id) for job_id in job_ids]
                    if job_keys:
                        pipe.watch(video_key, jobs_key, *job_keys)  # a status change restarts the delete
                    job_statuses = [pipe.hget(key, "status") for key in job_keys]
                    sha_key = self.keys.tenant_sha(record["tenant"], record["sha256"])
                    sha_owner = pipe.get(sha_key)
                    pipe.multi()
                    pipe.delete(video_key, jobs_key)
                    pipe.zrem(self.keys.tenant_videos(record["tenant"]), video_id)
                    if sha_owner == video_id:  # a retry after a failure may own the sha by now
                        pipe.delete(sha_key)
                    pipe.hincrby(self.keys.counter("videos"), record["status"], -1)
                    for job_id, status in zip(job_ids, job_statuses, strict=True):
                        pipe.delete(self.keys.job(job_id), self.keys.job_events(job_id),
                                    self.keys.job_lease(job_id), self.keys.job_fence(job_id))  # fmt: skip
                        pipe.zrem(self.keys.active_jobs(), job_id)
                        if status is not None:
                            pipe.hincrby(self.keys.counter("jobs"), json.loads(status), -1)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    # ---- jobs ---------------------------------------------------------------------------------------

    def create_job(self, *, tenant: str, video_id: str, kind: str, **fields: Any) -> dict:
        """A new job ("index" or "answer") about an existing video. LookupError when the video is gone.

        Answer jobs carry question, mode and max_new_tokens; workers later set answer, token_count,
        cache_hit, cache_tier, cache_reason, timings, timeline, top_moments, error_*, started_at, finished_at.
        """
        job_id = new_id("job")
        now = time.time()
        record = {
            "id": job_id, "tenant": tenant, "video_id": video_id, "kind": kind,
            "status": JobStatus.QUEUED.value, "question": None, "mode": None, "max_new_tokens": None,
            "answer": None, "token_count": None, "cache_hit": None, "cache_tier": None, "cache_reason": None,
            "timings": None, "timeline": None, "top_moments": None, "error_code": None, "error_message": None,
            "started_at": None, "finished_at": None, "created_at": now, "updated_at": now,
        }  # fmt: skip
        record.update(fields)
        video_key = self.keys.video(video_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(video_key)  # no orphan job if the video is deleted meanwhile
                    if not pipe.exists(video_key):
                        pipe.unwatch()
                        raise LookupError(f"video {video_id} does not exist")
                    pipe.multi()
                    pipe.hset(self.keys.job(job_id), mapping=_encode(record))
                    pipe.sadd(self.keys.video_jobs(video_id), job_id)
                    pipe.zadd(self.keys.active_jobs(), {job_id: now})  # until it finishes
                    pipe.hincrby(self.keys.counter("jobs"), record["status"], 1)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def get_job(self, job_id: str, tenant: str | None = None) -> dict | None:
        """The job, or None when absent or owned by another tenant (tenant=None: no check, for workers)."""
        return self._get(self.keys.job(job_id), tenant)

    def _get(self, key: str, tenant: str | None) -> dict | None:
        if tenant is None:
            raw = self.client.hgetall(key)
        else:
            reply = self._get_owned_script(keys=[key], args=[json.dumps(tenant)])
            raw = dict(zip(reply[::2], reply[1::2], strict=True))
        return _decode(raw) if raw else None

    def update_job(self, job_id: str, **fields: Any) -> bool:
        """Set fields (and updated_at). False, and nothing written, when the job was deleted.

        A job that reaches a terminal status leaves `Keys.active_jobs()` (if this process dies in between,
        the stale-job reaper drops it there)."""
        updated = self._update(self.keys.job(job_id), self.keys.counter("jobs"), fields,
                               event=_event(JOB_EVENTS, fields, job_id))  # fmt: skip
        if updated and fields.get("status") in TERMINAL_JOB_STATES:
            self.client.zrem(self.keys.active_jobs(), job_id)
        return updated

    def active_jobs(self) -> list[str]:
        """Ids of the jobs not known to be finished, oldest first (see `update_job`)."""
        return self.client.zrange(self.keys.active_jobs(), 0, -1)

    def append_event(self, job_id: str, kind: str, data: dict) -> str | None:
        """XADD an event ("status", "progress", "token", "done") to the job's stream -> its id.

        None, and nothing written, when the job was deleted. Update the job record BEFORE appending a
        "status"/"done" event: readers re-read the record when they see one.
        """
        event_id = self._append_script(
            keys=[self.keys.job(job_id), self.keys.job_events(job_id)],
            args=[EVENT_STREAM_MAXLEN, kind, json.dumps(data)],
        )
        return event_id or None

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, str, dict]]:
        """Events after the stream id `after` -> [(id, kind, data)]; waits up to block_ms for the first."""
        response = self.client.xread({self.keys.job_events(job_id): after}, count=count, block=block_ms)
        return decode_events(response)

    def last_event_id(self, job_id: str) -> str:
        """The id of the job's newest event, "0-0" when none: read after it to see only what comes next."""
        newest = self.client.xrevrange(self.keys.job_events(job_id), count=1)
        return newest[0][0] if newest else "0-0"

    # ---- artifacts (one may serve the videos of several tenants with identical bytes) ---------------

    def release_artifact(self, artifact_key: str, video_id: str) -> bool:
        """`video_id` (being deleted) no longer uses the artifact. True when no video does any more and no
        worker is rebuilding it: its index entry, LRU entry and byte count are gone, the caller deletes the
        file. The workers' disk tier (worker/serving/tiers.py) adds the index entries; `update_video` the
        users."""
        users_key, index_key = self.keys.artifact_users(artifact_key), self.keys.artifact(artifact_key)
        lock_key = self.keys.lock(artifact_key)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(users_key, index_key, lock_key)
                    others = pipe.smembers(users_key) - {video_id}
                    if others or pipe.exists(lock_key):
                        pipe.multi()
                        pipe.srem(users_key, video_id)
                        pipe.execute()
                        return False
                    size = pipe.hget(index_key, "bytes")
                    pipe.multi()
                    pipe.delete(users_key, index_key)
                    pipe.zrem(self.keys.artifact_lru(), artifact_key)
                    if size is not None:
                        size_bytes = float(json.loads(size))
                        pipe.hincrbyfloat(self.keys.counter("artifact_bytes"), "disk", -size_bytes)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    # ---- workers and metrics --------------------------------------------------------------------------

    def heartbeat(self, worker: str, state: dict | None = None) -> None:
        """Record that `worker` is alive now (call every few seconds; /readyz wants one under 30 s old), and
        its `state` for routing (service/routing.py `WorkerState`)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.workers(), worker, time.time())
            if state is not None:
                pipe.hset(self.keys.worker_states(), worker, json.dumps(state))
            pipe.execute()

    def live_workers(self, max_age_s: float = 30) -> list[str]:
        """Workers whose last heartbeat is younger than max_age_s."""
        now = time.time()
        beats = self.client.hgetall(self.keys.workers())
        return sorted(name for name, at in beats.items() if now - float(at) < max_age_s)

    def incr_counter(self, name: str, field: str, amount: float = 1) -> None:
        """Add to a shared counter, e.g. ("cache", "hit:memory"), ("cache", "miss:none")."""
        self.client.hincrbyfloat(self.keys.counter(name), field, amount)

    def counters(self, name: str) -> dict[str, float]:
        """Every field of a shared counter hash."""
        return {field: float(value) for field, value in self.client.hgetall(self.keys.counter(name)).items()}

    # ---- internals ------------------------------------------------------------------------------------

    def _update(
        self, key: str, counter_key: str, fields: dict[str, Any], users_key: str | None = None,
        user: str = "", event: str = "",
    ) -> bool:  # fmt: skip
        fields = {**fields, "updated_at": time.time()}
        status = json.dumps(str(fields["status"])) if fields.get("status") is not None else ""
        args: list[str | float] = [status, user if users_key else "", event, fields["updated_at"]]
        for name, value in _encode(fields).items():
            args += [name, value]
        keys = [key, counter_key, users_key or key, self.keys.webhooks_due()]
        return bool(self._update_script(keys=keys, args=args))


def _event(events: dict[str, str], fields: dict[str, Any], record_id: str) -> str:
    """The webhook event ("<type>|<id>") a change to these fields is, or "" when none."""
    kind = events.get(fields.get("status"))
    return f"{kind}|{record_id}" if kind else ""


def new_id(kind: str) -> str:
    """An unguessable id: "vid_..." or "job_..." with 128 random bits."""
    return f"{kind}_{secrets.token_urlsafe(16)}"
