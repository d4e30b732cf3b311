"""Conversations about a video: an ordered list of answer jobs whose questions and answers become the
history of the next question's prompt (the worker reads it through `history`).

Redis layout (`service.contract.Keys`): `conversation(id)` a hash (tenant, video_id, times; JSON-encoded
fields like `Records`), `conversation_jobs(id)` a list of job ids in asking order, and
`video_conversations(video_id)` a sorted set of the video's conversations by creation time. All of it is
deleted with the video.
"""

from __future__ import annotations

import json
import time

import redis

from service.contract import JobStatus, Keys
from service.records import Records, new_id


class Conversations:
    """Conversation records next to `Records` (same client, same key layout)."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.client: redis.Redis = records.client
        self.keys: Keys = records.keys

    def create(self, *, tenant: str, video_id: str) -> dict:
        now = time.time()
        record = {"id": new_id("conv"), "tenant": tenant, "video_id": video_id, "created_at": now,
                  "updated_at": now}  # fmt: skip
        with self.client.pipeline() as pipe:
            pipe.hset(self.keys.conversation(record["id"]), mapping=_encode(record))
            pipe.zadd(self.keys.video_conversations(video_id), {record["id"]: now})
            pipe.execute()
        return record

    def get(self, conversation_id: str, tenant: str | None = None) -> dict | None:
        """The conversation, or None when absent or another tenant's (tenant=None: no check)."""
        raw = self.client.hgetall(self.keys.conversation(conversation_id))
        if not raw:
            return None
        record = {name: json.loads(value) for name, value in raw.items()}
        if tenant is not None and record["tenant"] != tenant:
            return None
        return record

    def add_job(self, conversation_id: str, job_id: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.rpush(self.keys.conversation_jobs(conversation_id), job_id)
            pipe.hset(self.keys.conversation(conversation_id), "updated_at", json.dumps(time.time()))
            pipe.execute()

    def job_ids(self, conversation_id: str) -> list[str]:
        return self.client.lrange(self.keys.conversation_jobs(conversation_id), 0, -1)

    def jobs(self, conversation_id: str) -> list[dict]:
        """The conversation's jobs in asking order (jobs deleted meanwhile are left out)."""
        found = (self.records.get_job(job_id) for job_id in self.job_ids(conversation_id))
        return [job for job in found if job is not None]

    def history(self, conversation_id: str, before_job_id: str) -> list[tuple[str, str]]:
        """(question, answer) of every answered job asked before `before_job_id`, oldest first."""
        ids = self.job_ids(conversation_id)
        earlier = ids[: ids.index(before_job_id)] if before_job_id in ids else ids
        found = (self.records.get_job(job_id) for job_id in earlier)
        return [
            (job["question"], job["answer"])
            for job in found
            if job is not None and job["status"] == JobStatus.SUCCEEDED and job.get("answer") is not None
        ]

    def for_video(self, video_id: str) -> list[dict]:
        """The video's conversations, newest first."""
        ids = self.client.zrevrange(self.keys.video_conversations(video_id), 0, -1)
        found = (self.get(conversation_id) for conversation_id in ids)
        return [conversation for conversation in found if conversation is not None]

    def delete_for_video(self, video_id: str) -> int:
        """Delete every conversation of the video -> how many."""
        index = self.keys.video_conversations(video_id)
        ids = self.client.zrange(index, 0, -1)
        with self.client.pipeline() as pipe:
            for conversation_id in ids:
                pipe.delete(
                    self.keys.conversation(conversation_id), self.keys.conversation_jobs(conversation_id)
                )
            pipe.delete(index)
            pipe.execute()
        return len(ids)


def _encode(fields: dict) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}
