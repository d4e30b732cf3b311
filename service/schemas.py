"""The API's request and response bodies: records (service.records) are dicts, these the public shape."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.contract import AskMode, CacheTier, JobStatus, VideoStatus


def iso(unix: float | None) -> datetime | None:
    return None if unix is None else datetime.fromtimestamp(unix, tz=UTC)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. not_found, question_empty.")
    message: str = Field(description="Human-readable explanation; never a stack trace.")


class ErrorBody(BaseModel):
    """Every error response: {"error": {"code": ..., "message": ...}}."""

    error: ErrorDetail


# Record fields published as they are; the others are reshaped (error, timestamps, links, ...).
_VIDEO_FACTS = (
    "id", "status", "stage", "progress", "filename", "size_bytes", "sha256", "container", "duration",
    "frames", "damaged_seconds", "tokens_before", "tokens_after", "artifact_bytes", "features_bytes",
    "cache_tier", "callback_url", "webhook",
)  # fmt: skip
_JOB_FACTS = (
    "id", "kind", "video_id", "status", "question", "mode", "max_new_tokens", "answer", "token_count",
    "timings", "conversation_id", "history_turns", "warnings", "callback_url", "webhook", "worker", "route",
)  # fmt: skip


class WebhookDelivery(BaseModel):
    """How the resource's webhook event is getting on."""

    event_id: str
    type: str = Field(description="video.ready, video.failed, job.succeeded or job.failed")
    attempts: int
    delivered: bool
    last_result: str = Field(description="The receiver's HTTP status, or why no answer came.")
    next_attempt_at: float | None = Field(description="Unix seconds; none once delivered or given up.")


class VideoLinks(BaseModel):
    self: str
    index_job: str | None = Field(description="Poll this job (or its events) to follow indexing.")


class VideoPublic(BaseModel):
    """An uploaded video and how far its indexing got."""

    id: str
    status: VideoStatus
    stage: str = Field(description="What indexing is doing now, finer than status.")
    progress: float = Field(ge=0, le=1)
    filename: str
    size_bytes: int
    sha256: str
    container: str = Field(description="Sniffed from the first bytes: mp4, mov, mkv, webm, avi, mpegts, ...")
    duration: float | None = Field(description="Seconds, once decoded.")
    frames: int | None = Field(description="Frames sampled for the model.")
    damaged_seconds: list[list[float]] | None = Field(
        description="[[start, end], ...] seconds of the video that lie in damaged data and could not be "
        "decoded (their frames repeat the nearest good one); empty when the file decoded whole. Indexing "
        "fails as corrupt_video when more than half of the sampled frames are lost.",
    )
    tokens_before: int | None = Field(description="Video tokens before compression.")
    tokens_after: int | None = Field(description="Video tokens kept in the compressed cache.")
    artifact_bytes: int | None
    features_bytes: int | None = Field(
        description="The vision features kept beside the compressed cache for question-guided answers."
    )
    cache_tier: CacheTier | None
    callback_url: str | None = Field(description="Where video.ready or video.failed is POSTed.")
    webhook: WebhookDelivery | None
    error: ErrorDetail | None = Field(description="Why indexing failed, when status is failed.")
    created_at: datetime
    updated_at: datetime
    links: VideoLinks

    @classmethod
    def from_record(cls, record: dict) -> VideoPublic:
        error = None
        if record.get("error_code"):
            error = ErrorDetail(code=record["error_code"], message=record.get("error_message") or "")
        index_job = record.get("index_job_id")
        return cls(
            **{name: record.get(name) for name in _VIDEO_FACTS},
            error=error,
            created_at=iso(record["created_at"]),
            updated_at=iso(record["updated_at"]),
            links=VideoLinks(self=f"/videos/{record['id']}", index_job=index_job and f"/jobs/{index_job}"),
        )


class VideoList(BaseModel):
    """A page of the caller's videos, newest first."""

    items: list[VideoPublic]
    total: int
    offset: int
    limit: int


def _well_formed(text: str) -> str:
    """Text that can be stored and sent back as UTF-8: JSON may escape lone surrogates ("\\ud800"), which
    no UTF-8 encoder accepts, and control characters (NUL, ...) are no part of a question or an id."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text):
        raise ValueError("must not hold control characters (other than tab and newline)")
    return text


Text = Annotated[str, AfterValidator(_well_formed)]
CallbackURL = Annotated[
    Text | None,
    Field(max_length=8192, description="An https (or http) URL to POST the signed webhook event to when "
          "this finishes (service/webhooks.py)."),
]  # fmt: skip


class AskCreate(BaseModel):
    """A question about an uploaded video."""

    model_config = ConfigDict(extra="forbid")

    video_id: Text
    question: Text = Field(description="Not blank; at most VIDEOQA_MAX_QUESTION_CHARS characters.")
    # strict: "12", true and 1000.0 are not token counts
    max_new_tokens: int = Field(default=128, ge=1, strict=True, description="At most "
                                "VIDEOQA_MAX_NEW_TOKENS_LIMIT.")  # fmt: skip
    mode: AskMode = AskMode.CACHED
    conversation_id: str | None = Field(
        default=None,
        description="Continue this conversation (from an earlier job): its questions and answers go into "
        "the prompt. Without it, the question starts a new conversation.",
    )
    callback_url: CallbackURL = None


class VideoFromURL(BaseModel):
    """A video to fetch (http or https; the service refuses private and internal addresses)."""

    model_config = ConfigDict(extra="forbid")

    url: Text = Field(max_length=8192)
    callback_url: CallbackURL = None


class Reread(BaseModel):
    """What a focused answer re-read of the video, beside its compressed cache."""

    windows: list[list[float]] = Field(description="[[start, end], ...] seconds re-read, in time order.")
    moments: list[list[float]] = Field(description="[[seconds, share], ...]: the first pass's top moments.")
    frames: int = Field(description="Frames re-read and encoded.")
    decoded_frames: int = Field(description="Frames the decoder produced to get them.")
    fps: float
    frame_size: list[int] = Field(description="[width, height] of a re-read frame.")
    tokens: int = Field(description="Tokens prefilled after the cached video: the clips and their times.")


class CacheInfo(BaseModel):
    hit: bool | None = Field(description="Whether the compressed cache was reused.")
    tier: CacheTier | None
    reason: str | None = Field(description="Why it was or was not a hit.")
    reread: Reread | None = Field(default=None, description="mode=focused: what was re-read of the video.")


class Moment(BaseModel):
    seconds: float
    share: float = Field(description="This frame's share of the evidence (where the question looked).")
    frame: int = Field(description="Index of the sampled frame (in `timeline`).")
    thumbnail: str = Field(description="The frame's thumbnail (GET; Bearer key or ?token=).")


class Evidence(BaseModel):
    timeline: list[list[float]] | None = Field(description="[[seconds, share of attention], ...] per frame.")
    top_moments: list[Any] | None = Field(description="The moments the answer attended to most.")
    moments: list[Moment] | None = Field(description="`top_moments` with their frames and thumbnails.")

    @classmethod
    def from_record(cls, record: dict) -> Evidence:
        timeline, top = record.get("timeline"), record.get("top_moments")
        moments = None
        if timeline is not None and top is not None:
            frame_of = {}
            for index, (seconds, _) in enumerate(timeline):
                frame_of.setdefault(seconds, index)
            moments = [
                Moment(seconds=seconds, share=share, frame=frame_of[seconds],
                       thumbnail=f"/videos/{record['video_id']}/frames/{frame_of[seconds]}")
                for seconds, share in (item for item in top if isinstance(item, list) and len(item) == 2)
                if seconds in frame_of
            ]  # fmt: skip
        return cls(timeline=timeline, top_moments=top, moments=moments)


class JobLinks(BaseModel):
    self: str
    events: str
    video: str


class JobPublic(BaseModel):
    """Indexing a video or answering a question: its state and, when done, its result."""

    id: str
    kind: str = Field(description="index or answer")
    video_id: str
    status: JobStatus
    question: str | None
    mode: AskMode | None
    max_new_tokens: int | None
    answer: str | None
    token_count: int | None
    conversation_id: str | None = Field(description="Pass it with the next question to follow up.")
    history_turns: int | None = Field(description="Earlier exchanges that fit the prompt's history budget.")
    cache: CacheInfo | None
    worker: str | None = Field(description="The worker that answered.")
    route: str | None = Field(
        description="Why the ask went to its queue: holder (that worker held the video in memory), hash (the "
        "video's worker by rendezvous hashing), guard (the least loaded worker: the chosen one had too "
        "long a backlog) or shared (the queue every worker takes from)."
    )
    timings: dict[str, float] | None = Field(description="Seconds per stage.")
    warnings: list[str] | None = Field(
        description="What the job worked around, e.g. damaged seconds of the video it indexed."
    )
    evidence: Evidence | None
    callback_url: str | None = Field(description="Where job.succeeded or job.failed is POSTed.")
    webhook: WebhookDelivery | None
    error: ErrorDetail | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: JobLinks

    @classmethod
    def from_record(cls, record: dict) -> JobPublic:
        error = None
        if record.get("error_code"):
            error = ErrorDetail(code=record["error_code"], message=record.get("error_message") or "")
        cache = None
        if record.get("cache_hit") is not None or record.get("cache_tier") is not None:
            cache = CacheInfo(hit=record.get("cache_hit"), tier=record.get("cache_tier"),
                              reason=record.get("cache_reason"), reread=record.get("focus"))  # fmt: skip
        evidence = None
        if record.get("timeline") is not None or record.get("top_moments") is not None:
            evidence = Evidence.from_record(record)
        return cls(
            **{name: record.get(name) for name in _JOB_FACTS},
            cache=cache,
            evidence=evidence,
            error=error,
            created_at=iso(record["created_at"]),
            updated_at=iso(record["updated_at"]),
            started_at=iso(record.get("started_at")),
            finished_at=iso(record.get("finished_at")),
            links=JobLinks(
                self=f"/jobs/{record['id']}",
                events=f"/jobs/{record['id']}/events",
                video=f"/videos/{record['video_id']}",
            ),  # fmt: skip
        )


class ConversationPublic(BaseModel):
    """Questions about one video that follow up on each other, with their answer jobs in asking order."""

    id: str
    video_id: str
    created_at: datetime
    updated_at: datetime
    turns: list[JobPublic]

    @classmethod
    def from_record(cls, record: dict, jobs: list[dict]) -> ConversationPublic:
        return cls(
            id=record["id"],
            video_id=record["video_id"],
            created_at=iso(record["created_at"]),
            updated_at=iso(record["updated_at"]),
            turns=[JobPublic.from_record(job) for job in jobs],
        )


class ConversationList(BaseModel):
    """A video's conversations, newest first."""

    items: list[ConversationPublic]


class MediaToken(BaseModel):
    """A signed, expiring grant to one video's content and frames, for `<video src>` and `<img src>`."""

    token: str
    expires_at: int = Field(description="Unix seconds.")
    content_url: str
    frames_url: str = Field(description="A template: replace {index} with a frame's index.")


class Health(BaseModel):
    status: str
    workers: list[str] | None = None
