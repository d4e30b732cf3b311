"""The contract between the API tier and the workers: settings, task names, states and Redis keys.

Both tiers import this module and nothing else of each other. It imports neither torch nor FastAPI nor
Celery, so the API image stays small and workers do not pull the web stack.
"""

from __future__ import annotations

import errno
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# ---- task names: the API enqueues by name (celery_app.send_task), never by importing worker code -----

# The names once matched the tasks' module (now worker.serving.tasks); they stay as they are, so messages
# already queued under them still route.
INDEX_TASK = "worker.tasks.index_video"
ANSWER_TASK = "worker.tasks.answer"
GPU_QUEUE = "gpu"


def worker_queue(worker: str) -> str:
    """The queue only `worker` consumes (besides GPU_QUEUE): where asks about the videos it holds are sent."""
    return f"{GPU_QUEUE}.{worker}"


# ---- states ------------------------------------------------------------------------------------------


class VideoStatus(StrEnum):
    DOWNLOADING = "downloading"  # given by URL: the API is fetching it
    QUEUED = "queued"
    DECODING = "decoding"
    ENCODING = "encoding"
    PREFILLING = "prefilling"
    READY = "ready"
    FAILED = "failed"


class JobStatus(StrEnum):
    QUEUED = "queued"
    WAITING_FOR_INDEX = "waiting_for_index"  # the video is still being indexed by another job
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_JOB_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED})


# OSError numbers that mean "the data volume is full": no space, quota exceeded, file size limit. Uploads
# answer 507 storage_full, workers fail the video with code "storage_full".
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class AskMode(StrEnum):
    CACHED = "cached"  # the video's compressed cache, built once with a generic guide prompt
    QUESTION_GUIDED = "question_guided"  # compressed anew with the question as the guide (slower)
    FOCUSED = "focused"  # from the cache, then again after re-reading the video around its top moments


class CacheTier(StrEnum):
    MEMORY = "memory"  # the worker process's LRU (GPU memory on GPU workers)
    DISK = "disk"  # the shared volume
    NONE = "none"  # compressed for this request (miss, or question-guided)


# ---- Redis key layout --------------------------------------------------------------------------------


class Keys:
    """Every Redis key the service uses, in one place. `prefix` namespaces a deployment."""

    def __init__(self, prefix: str = "videoqa") -> None:
        self.prefix = prefix

    def video(self, video_id: str) -> str:
        """Hash: the video record (tenant, sha256, status, progress, facts, error)."""
        return f"{self.prefix}:video:{video_id}"

    def tenant_videos(self, tenant: str) -> str:
        """Sorted set: the tenant's video ids scored by creation time (pagination)."""
        return f"{self.prefix}:tenant:{tenant}:videos"

    def tenant_sha(self, tenant: str, sha256: str) -> str:
        """String: the tenant's video id for this content (same bytes uploaded again -> same video)."""
        return f"{self.prefix}:tenant:{tenant}:sha:{sha256}"

    def job(self, job_id: str) -> str:
        """Hash: the job record (tenant, video, kind, status, answer, cache facts, timings, evidence)."""
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Stream: the job's progress and answer-token events, for Server-Sent Events."""
        return f"{self.prefix}:job:{job_id}:events"

    def video_jobs(self, video_id: str) -> str:
        """Set: ids of every job about a video (deleted with it)."""
        return f"{self.prefix}:video:{video_id}:jobs"

    def conversation(self, conversation_id: str) -> str:
        """Hash: a conversation (tenant, video, times); its turns are `conversation_jobs`."""
        return f"{self.prefix}:conversation:{conversation_id}"

    def conversation_jobs(self, conversation_id: str) -> str:
        """List: the conversation's answer job ids in asking order (the next prompt's history)."""
        return f"{self.prefix}:conversation:{conversation_id}:jobs"

    def video_conversations(self, video_id: str) -> str:
        """Sorted set: the video's conversation ids by creation time (deleted with it)."""
        return f"{self.prefix}:video:{video_id}:conversations"

    def artifact(self, artifact_key: str) -> str:
        """Hash: the index entry of one compressed artifact (bytes, tier, last use, metadata)."""
        return f"{self.prefix}:artifact:{artifact_key}"

    def artifact_lru(self) -> str:
        """Sorted set: artifact keys on disk scored by last use, for the disk tier's LRU eviction."""
        return f"{self.prefix}:artifacts:lru"

    def artifact_users(self, artifact_key: str) -> str:
        """Set: video ids whose index is this artifact (identical bytes of several tenants share one)."""
        return f"{self.prefix}:artifact:{artifact_key}:videos"

    def lock(self, artifact_key: str) -> str:
        """String with a TTL: the single-flight lease (its holder's fencing token) while one worker builds
        this artifact; renewed by the builder, gone within the lease time of its death."""
        return f"{self.prefix}:lock:{artifact_key}"

    def fence(self, artifact_key: str) -> str:
        """Integer: the artifact lease's fencing counter (one more per acquisition)."""
        return f"{self.prefix}:fence:{artifact_key}"

    def job_lease(self, job_id: str) -> str:
        """String with a TTL: the token of the worker running this job, renewed while it runs."""
        return f"{self.prefix}:job:{job_id}:lease"

    def job_fence(self, job_id: str) -> str:
        """Integer: the job lease's fencing counter (one more per run of the job)."""
        return f"{self.prefix}:job:{job_id}:fence"

    def active_jobs(self) -> str:
        """Sorted set: ids of the jobs not yet finished, scored by creation time, for the stale-job reaper."""
        return f"{self.prefix}:jobs:active"

    def reaper(self) -> str:
        """String with a TTL: the lease of the one worker sweeping for stale jobs right now."""
        return f"{self.prefix}:reaper"

    def workers(self) -> str:
        """Hash: worker name -> last heartbeat (unix seconds), for /readyz."""
        return f"{self.prefix}:workers"

    def worker_states(self) -> str:
        """Hash: worker name -> JSON {"at", "artifacts"}: when it last wrote and the keys of the artifacts its
        memory tier holds, for routing follow-ups to it."""
        return f"{self.prefix}:worker-states"

    def worker_tasks(self) -> str:
        """Hash: worker name -> the tasks it runs now (counted up and down by the worker as they start and
        end), for routing's load guard."""
        return f"{self.prefix}:worker-tasks"

    def downloads(self) -> str:
        """Sorted set: videos given by URL, by when their download must have ended (the reaper fails those
        still downloading after it: their API process died)."""
        return f"{self.prefix}:downloads"

    def webhooks_due(self) -> str:
        """Sorted set: webhook events ("<type>|<resource id>") by when their next delivery attempt is due."""
        return f"{self.prefix}:webhooks:due"

    def webhook_event(self, event: str) -> str:
        """Hash: a webhook event's body (built at its first attempt, the same on every attempt), its URL and
        its attempts so far."""
        return f"{self.prefix}:webhook:{event}"

    def counter(self, name: str) -> str:
        """Hash of counters shared by all processes (cache hits/misses by tier, ...), for /metrics."""
        return f"{self.prefix}:metrics:{name}"


# ---- settings ---------------------------------------------------------------------------------------


class Settings(BaseSettings):
    """One per process, from VIDEOQA_* environment variables. Fails fast on nonsense."""

    model_config = SettingsConfigDict(env_prefix="VIDEOQA_", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "videoqa"
    data_dir: Path = Path("./data")  # uploads/ and artifacts/ live here: a volume shared by API and workers
    max_upload_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_question_chars: int = Field(default=2000, gt=0)
    max_new_tokens_limit: int = Field(default=1024, gt=0)
    # "key" or "key:tenant" entries, comma-separated; empty: no authentication, one tenant "public".
    api_keys: str = ""
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser
    long_poll_max_seconds: float = Field(default=30.0, ge=0)
    # Signed media URLs (a <video> cannot send a Bearer header): secret (default: derived from api_keys)
    # and lifetime in seconds.
    media_token_secret: str = ""
    media_token_seconds: int = Field(default=3600, gt=0)
    # The earlier questions and answers of a conversation kept in a follow-up's prompt, in tokens.
    conversation_history_tokens: int = Field(default=2048, ge=0)
    # workers
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    device: str = "auto"
    dtype: str = "auto"
    preset: str = "paper-7b"
    memory_cache_bytes: int = Field(default=8 * 1024**3, ge=0)
    disk_cache_bytes: int = Field(default=200 * 1024**3, ge=0)
    task_time_limit: int = Field(default=3600, ge=10)  # seconds; see soft_time_limit
    # Tasks one worker runs at once, all on its one scheduler (threads: they mostly wait for it); 1 runs one
    # task at a time, as a serial worker.
    worker_concurrency: int = Field(default=16, ge=1)
    # The scheduler (worker/engine/scheduler.py): answers decoding together, waiting answers prefilled per
    # iteration, the share of its time indexing gets while answers are active, and the bytes the active
    # answers' caches may hold.
    scheduler_max_active: int = Field(default=16, ge=1)
    scheduler_max_admit: int = Field(default=8, ge=1)
    scheduler_index_share: float = Field(default=0.5, gt=0, le=1)
    scheduler_cache_bytes: int = Field(default=4 * 1024**3, gt=0)
    # Focused answers (worker/engine/focus.py): the top evidence moments re-read, the seconds re-read around
    # each, at what frame rate, and the longest side of a re-read frame (0: the compression's).
    focus_moments: int = Field(default=2, ge=1)
    focus_window_seconds: float = Field(default=2.0, gt=0)
    focus_fps: float = Field(default=2.0, gt=0)
    focus_long_side: int = Field(default=0, ge=0)
    # Routing asks across workers (service/routing.py): "affinity" sends a follow-up to a worker whose memory
    # tier holds its video, else to the one rendezvous hashing picks, unless that worker's backlog exceeds the
    # least loaded one's by more than `routing_guard_tasks` and `routing_guard_ratio` times; "shared" puts
    # every ask on the one queue all workers take from.
    routing: Literal["affinity", "shared"] = "affinity"
    routing_guard_tasks: int = Field(default=2, ge=0)
    routing_guard_ratio: float = Field(default=1.5, ge=1)
    # A job's and a build's lease outlive their worker's death by at most this many seconds.
    lease_seconds: float = Field(default=30.0, ge=1)
    # How often a worker sweeps for jobs whose worker died (see worker/recovery.py), and how many runs a
    # job gets before it fails with "worker_lost".
    reaper_interval_seconds: float = Field(default=10.0, gt=0)
    job_attempts: int = Field(default=3, ge=1)
    # Compressed caches are per tenant unless this is set: sharing them saves GPU time on identical uploads
    # but tells a tenant that someone else uploaded the same bytes (an instant, cached "ready").
    share_cache_across_tenants: bool = False
    # An upload that sends nothing for this long is answered 408 and its connection freed.
    upload_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    # The OpenAI-compatible API (/v1): the model id it reports (default: the name of VIDEOQA_MODEL's
    # folder, or the hub id as given), how long a chat completion waits for its answer (indexing included),
    # and the largest request body one may send (a video inlined as a data: URL, base64).
    served_model_name: str = ""
    chat_wait_seconds: float = Field(default=600.0, gt=0)
    max_chat_body_bytes: int = Field(default=64 * 1024**2, gt=0)
    # Videos by URL and webhooks: the networks they may reach that the SSRF guard otherwise refuses
    # (comma-separated CIDRs; empty: public addresses only) and how long a download may take in all.
    url_allowed_networks: str = ""
    url_timeout_seconds: float = Field(default=600.0, gt=0)
    # Webhooks (service/webhooks.py): the HMAC secret that signs them (empty: callback_url is refused) and
    # the delay before the first retry (each next one four times longer, up to 8 hours).
    webhook_secret: str = ""
    webhook_first_retry_seconds: float = Field(default=5.0, gt=0, le=10)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys_well_formed(cls, value: str) -> str:
        for entry in filter(None, (e.strip() for e in value.split(","))):
            key = entry.split(":", 1)[0]
            if len(key) < 16:
                raise ValueError("every API key must be at least 16 characters long")
        return value

    @field_validator("url_allowed_networks")
    @classmethod
    def _networks_well_formed(cls, value: str) -> str:
        import ipaddress

        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part)  # ValueError: not a CIDR (or host bits set)
        return value

    @property
    def soft_time_limit(self) -> float:
        """When a task is told to stop (SoftTimeLimitExceeded, recorded as "timeout"): 60 s before the hard
        limit, or a tenth of it for short limits, so a small limit never leaves a task a second."""
        return self.task_time_limit - min(60.0, self.task_time_limit / 10)

    @property
    def served_model(self) -> str:
        """The model's id in /v1: VIDEOQA_SERVED_MODEL_NAME, else the checkpoint folder's name, else the
        hub id."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if Path(self.model).is_dir() else self.model

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def frames_dir(self, artifact_key: str) -> Path:
        """The thumbnails of an artifact's sampled frames (`<index>.jpg`), deleted with the artifact."""
        return self.artifacts_dir / f"{artifact_key}.frames"

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    def tenants_by_key(self) -> dict[str, str]:
        """API key -> tenant. A key without ":tenant" is its own tenant, named by a hash of the key."""
        import hashlib

        tenants = {}
        for entry in filter(None, (e.strip() for e in self.api_keys.split(","))):
            key, _, tenant = entry.partition(":")
            tenants[key] = tenant or "t" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return tenants

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
