"""Asking a question about a video: creates an answer job for the GPU workers."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import ConversationsDep, QueueDep, RecordsDep, SettingsDep, TenantDep
from service.errors import APIError, not_found, responses
from service.schemas import AskCreate, JobPublic
from service.submissions import check_answerable, submit_answer
from service.webhooks import check_callback

router = APIRouter(prefix="/ask", tags=["asks"])

ANSWER_RETRY_AFTER_S = 2


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses=responses(400, 401, 404, 409, 413, 422, 503),
)
def ask(
    body: AskCreate, response: Response, settings: SettingsDep, records: RecordsDep, queue: QueueDep,
    conversations: ConversationsDep, tenant: TenantDep,
) -> JobPublic:  # fmt: skip
    """Ask a question about a video; poll the returned job (or stream its events) for the answer."""
    question = body.question.strip()
    if not question:
        raise APIError(422, "question_empty", "the question is empty")
    if len(body.question) > settings.max_question_chars:  # as sent: openapi.yaml's maxLength
        raise APIError(422, "question_too_long",
                       f"the question is longer than {settings.max_question_chars} characters")  # fmt: skip
    max_new_tokens = body.max_new_tokens
    if "max_new_tokens" not in body.model_fields_set:  # the default never exceeds the configured limit
        max_new_tokens = min(max_new_tokens, settings.max_new_tokens_limit)
    if max_new_tokens > settings.max_new_tokens_limit:
        raise APIError(422, "validation_error",
                       f"max_new_tokens: at most {settings.max_new_tokens_limit}")  # fmt: skip
    callback = {"callback_url": check_callback(body.callback_url, settings)} if body.callback_url else {}
    video = records.get_video(body.video_id, tenant)
    if video is None:
        raise not_found("video")
    check_answerable(video)
    if body.conversation_id is None:
        conversation = conversations.create(tenant=tenant, video_id=video["id"])
    else:
        conversation = conversations.get(body.conversation_id, tenant)
        if conversation is None:
            raise not_found("conversation")
        if conversation["video_id"] != video["id"]:
            raise APIError(409, "conversation_mismatch", "the conversation is about another video")
    job = submit_answer(
        records, queue, tenant=tenant, video=video, question=question, mode=body.mode.value,
        max_new_tokens=max_new_tokens, conversation_id=conversation["id"], **callback,
    )  # fmt: skip
    conversations.add_job(conversation["id"], job["id"])
    response.headers["Location"] = f"/jobs/{job['id']}"
    response.headers["Retry-After"] = str(ANSWER_RETRY_AFTER_S)
    return JobPublic.from_record(job)
