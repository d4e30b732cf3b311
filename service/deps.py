"""Dependencies, as Annotated aliases the routes declare: SettingsDep, RecordsDep, TenantDep, ..."""

from __future__ import annotations

import secrets
from typing import Annotated

import redis.asyncio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.contract import Settings
from service.conversations import Conversations
from service.downloads import Downloads
from service.errors import APIError
from service.metrics import Metrics
from service.queue import TaskQueue
from service.records import Records

PUBLIC_TENANT = "public"

bearer = HTTPBearer(auto_error=False, description="An API key, when the service is configured with keys.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_records(request: Request) -> Records:
    return request.app.state.records


def get_conversations(request: Request) -> Conversations:
    return request.app.state.conversations


def get_async_redis(request: Request) -> redis.asyncio.Redis:
    """A redis.asyncio client (created in the lifespan), for blocking stream reads off the threadpool."""
    return request.app.state.async_redis


def get_queue(request: Request) -> TaskQueue:
    return request.app.state.queue


def get_downloads(request: Request) -> Downloads:
    return request.app.state.downloads


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The caller's tenant: the one its Bearer API key names, or "public" when no keys are configured."""
    tenants: dict[str, str] = request.app.state.tenants_by_key
    if not tenants:
        return PUBLIC_TENANT
    if credentials is not None:
        offered = credentials.credentials.encode()
        for key, tenant in tenants.items():  # compare with every key in constant time
            if secrets.compare_digest(offered, key.encode()):
                return tenant
    raise APIError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)",
                   headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecordsDep = Annotated[Records, Depends(get_records)]
ConversationsDep = Annotated[Conversations, Depends(get_conversations)]
AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DownloadsDep = Annotated[Downloads, Depends(get_downloads)]
TenantDep = Annotated[str, Depends(get_tenant)]
