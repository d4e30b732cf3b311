"""Conversations: the questions asked about a video that follow up on each other, and their answers."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ConversationsDep, RecordsDep, TenantDep
from service.errors import not_found, responses
from service.schemas import ConversationList, ConversationPublic

router = APIRouter(tags=["conversations"])


@router.get(
    "/conversations/{conversation_id}", response_model=ConversationPublic, responses=responses(401, 404)
)
def get_conversation(
    conversation_id: str, conversations: ConversationsDep, tenant: TenantDep
) -> ConversationPublic:
    """A conversation with every question and answer (answer jobs, in asking order)."""
    conversation = conversations.get(conversation_id, tenant)
    if conversation is None:
        raise not_found("conversation")
    return ConversationPublic.from_record(conversation, conversations.jobs(conversation_id))


@router.get(
    "/videos/{video_id}/conversations", response_model=ConversationList, responses=responses(401, 404)
)
def list_conversations(
    video_id: str, records: RecordsDep, conversations: ConversationsDep, tenant: TenantDep
) -> ConversationList:
    """The video's conversations, newest first, with their turns."""
    if records.get_video(video_id, tenant) is None:
        raise not_found("video")
    items = [
        ConversationPublic.from_record(conversation, conversations.jobs(conversation["id"]))
        for conversation in conversations.for_video(video_id)
    ]
    return ConversationList(items=items)
