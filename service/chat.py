"""A /v1 chat about one video: the video, question and history its messages hold, and an answer job's record
in OpenAI's shapes.

Stateless, as OpenAI's API is: the client resends the whole conversation, and its earlier turns become the
history after the cached video, whose compressed cache is reused untouched. System (and developer)
messages are left out: the prompt is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import APIError
from service.openai_schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatMessage,
    Choice,
    FilePart,
    PromptTokensDetails,
    TextPart,
    Usage,
    VideoqaFacts,
)
from service.schemas import JobPublic

# Answer jobs' error codes that are the service's fault, with their status; every other one is the request's
# (a video that does not decode, an answer too large for the cache): 400.
_SERVER_FAILURES = {"internal_error": 500, "out_of_memory": 503, "worker_lost": 503, "storage_full": 507,
                    "queue_unavailable": 503, "timeout": 504}  # fmt: skip


@dataclass(frozen=True)
class VideoRef:
    """The conversation's video: an uploaded file's id, or a URL to ingest (https, http or data:)."""

    file_id: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class ChatTurns:
    video: VideoRef
    question: str
    history: list[tuple[str, str]]  # (question, answer) of the earlier turns, oldest first


def read_messages(messages: list[ChatMessage]) -> ChatTurns:
    """The video, the question (the last user message) and the earlier exchanges; 400 with a code saying
    what is wrong otherwise."""
    videos: list[VideoRef] = []
    turns: list[tuple[str, str]] = []  # (role, text)
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            continue
        text, found = _read_content(message)
        if found and message.role != "user":
            raise _invalid("only a user message may hold the video", f"messages.{index}.content")
        videos += found
        turns.append((message.role, text))
    if len(videos) > 1:
        raise APIError(400, "too_many_videos", f"the messages refer to {len(videos)} videos; a conversation "
                       "is about one video: start a new one for another", param="messages")  # fmt: skip
    if not videos:
        raise APIError(400, "video_required", "no video in the messages: add a part of type file "
                       "({\"file_id\": ...}) or video_url", param="messages")  # fmt: skip
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise _invalid("the messages must alternate user and assistant, starting and ending with the user",
                       "messages")  # fmt: skip
    question = turns[-1][1].strip()
    if not question:
        raise APIError(400, "question_empty", "the last user message has no text", param="messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ChatTurns(videos[0], question, history)


def _read_content(message: ChatMessage) -> tuple[str, list[VideoRef]]:
    if not isinstance(message.content, list):
        return message.content or "", []
    texts, videos = [], []
    for part in message.content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, FilePart):
            videos.append(VideoRef(file_id=part.file.file_id))
        elif part.video_url is not None:
            videos.append(VideoRef(url=part.video_url.url))
        elif part.uuid is not None:  # vLLM's reference to media it has seen: here, an uploaded file
            videos.append(VideoRef(file_id=part.uuid))
        else:
            raise _invalid("a video_url part needs video_url.url or a uuid (a file id)", "messages")
    return "\n".join(texts), videos


def _invalid(message: str, param: str) -> APIError:
    return APIError(400, "invalid_messages", message, param=param)


def job_failure(job: dict) -> APIError:
    """The error a failed answer job becomes."""
    code = job.get("error_code") or "internal_error"
    message = job.get("error_message") or code
    return APIError(_SERVER_FAILURES.get(code, 400), code, message)


def finish_reason(job: dict) -> str:
    """ "length" when the answer used every token it was allowed, else "stop"."""
    return "length" if (job.get("token_count") or 0) >= (job.get("max_new_tokens") or 0) else "stop"


def usage(job: dict) -> Usage:
    """Tokens of the answer job: the prompt is the cached video's tokens and the text after it."""
    prompt, completion = job.get("prompt_tokens") or 0, job.get("token_count") or 0
    cached = PromptTokensDetails(cached_tokens=job.get("cached_tokens") or 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=cached)  # fmt: skip


def facts(job: dict) -> VideoqaFacts:
    """Our extras beside OpenAI's fields: the job, its cache facts and its evidence."""
    public = JobPublic.from_record(job)
    return VideoqaFacts(
        job_id=job["id"], video_id=job["video_id"], cache=public.cache, evidence=public.evidence
    )


def completion(job: dict, model: str) -> ChatCompletion:
    """A succeeded answer job as a chat.completion."""
    return ChatCompletion(
        id=completion_id(job), created=int(job["created_at"]), model=model,
        choices=[Choice(message=AssistantMessage(content=job.get("answer") or ""),
                        finish_reason=finish_reason(job))],
        usage=usage(job), videoqa=facts(job),
    )  # fmt: skip


def completion_id(job: dict) -> str:
    return f"chatcmpl-{job['id']}"
