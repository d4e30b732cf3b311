"""The /v1 bodies in OpenAI's shapes (models, files, chat completions), so the `openai` SDKs and the tools
built on them talk to the service unchanged. Fields OpenAI's clients ignore carry our extras (`videoqa`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract import VideoStatus
from service.schemas import CacheInfo, Evidence, Text


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found_error, server_error"
    )
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="Stable machine-readable code, as in the rest of the API.")


class OpenAIErrorBody(BaseModel):
    """Every /v1 error response, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    error: OpenAIErrorDetail


# ---- models ----------------------------------------------------------------------------------------


class ModelObject(BaseModel):
    """The model the workers serve."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# ---- files -----------------------------------------------------------------------------------------

FilePurpose = Literal["user_data", "vision"]
_FILE_STATUS = {VideoStatus.READY: "processed", VideoStatus.FAILED: "error"}


class FileObject(BaseModel):
    """An uploaded video as OpenAI's FileObject: `uploaded` while it is indexed, `processed` when ready."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = Field(description="Why indexing failed, when status is error.")

    @classmethod
    def from_record(cls, video: dict) -> FileObject:
        status = _FILE_STATUS.get(video["status"], "uploaded")
        details = None
        if status == "error":
            details = f"{video.get('error_code')}: {video.get('error_message') or ''}".rstrip(": ")
        return cls(
            id=video["id"], bytes=video["size_bytes"], created_at=int(video["created_at"]),
            filename=video["filename"], purpose=video.get("purpose") or "user_data", status=status,
            status_details=details,
        )  # fmt: skip


class FileList(BaseModel):
    """A page of the caller's files, newest first; pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# ---- chat completions: the request ------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields of their own (cache_control, detail...)


class TextPart(_Part):
    type: Literal["text"]
    text: Text


class FileRef(_Part):
    file_id: Text


class FilePart(_Part):
    """A video uploaded through /v1/files."""

    type: Literal["file"]
    file: FileRef


class VideoURL(_Part):
    url: str = Field(
        max_length=1 << 30, description='"https://...", "http://..." or "data:video/...;base64,..."'
    )


class VideoURLPart(_Part):
    """vLLM's video part: a URL, or `video_url: null` with the `uuid` of an uploaded file."""

    type: Literal["video_url"]
    video_url: VideoURL | None = None
    uuid: Text | None = None


ContentPart = Annotated[TextPart | FilePart | VideoURLPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted, not used

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


StopText = Annotated[Text, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionCreate(BaseModel):
    """A chat about one video: the last message is the question, the earlier ones its history."""

    model_config = ConfigDict(extra="allow")  # OpenAI's other parameters (n=1, user, ...): accepted, ignored

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, description="Absent or 0: greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(
        default=None, ge=-(2**63), lt=2**64, description="The same seed, the same answer."
    )
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        default=None, description="The answer ends before the first of these strings (at most 4)."
    )

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# ---- chat completions: the response ------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the video's compressed cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class VideoqaFacts(BaseModel):
    """Our own facts beside OpenAI's fields: the answer job, its cache facts and its evidence."""

    job_id: str
    video_id: str
    cache: CacheInfo | None
    evidence: Evidence | None


class ChatCompletion(BaseModel):
    """The answer, in OpenAI's chat.completion shape."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    videoqa: VideoqaFacts


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed answer (`data: <chunk>`; the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    videoqa: dict[str, Any] | None = None
