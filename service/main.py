"""The ASGI app: `uvicorn service.main:app`. Builds clients lazily: importing this connects to nothing."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.contract import Settings
from service.conversations import Conversations
from service.downloads import Downloads
from service.errors import install_error_handlers
from service.http import HeadMiddleware, JSONCORSMiddleware
from service.limits import BodyLimitMiddleware
from service.media import MediaTokens
from service.metrics import Metrics, MetricsMiddleware
from service.queue import TaskQueue
from service.records import Records
from service.recovery import Reaper
from service.routers import asks, chat, conversations, files, health, jobs, media, models, page, videos
from service.routing import Router
from service.uploads import incoming_dir, sweep_incoming
from service.webhooks import Deliverer


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for these settings (default: from VIDEOQA_* environment variables)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Created here, on the serving event loop; the long-poll and SSE routes block on it.
        # No socket timeout: XREAD BLOCK waits up to the long-poll cap or the SSE keep-alive, longer than
        # redis-py's default read timeout (5 s since 8.0), which would cut every quiet wait short.
        app.state.async_redis = redis.asyncio.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=None
        )
        await anyio.to_thread.run_sync(sweep_incoming, incoming_dir(settings))
        stopping = threading.Event()
        reaper = threading.Thread(target=Reaper(app.state.records, app.state.queue, settings).run,
                                  args=(stopping,), name="videoqa-reaper", daemon=True)  # fmt: skip
        reaper.start()
        deliverer = threading.Thread(target=Deliverer(app.state.records, settings).run, args=(stopping,),
                                     name="videoqa-webhooks", daemon=True)  # fmt: skip
        deliverer.start()
        yield
        await app.state.downloads.close()
        stopping.set()
        reaper.join(timeout=15)
        deliverer.join(timeout=15)
        await app.state.async_redis.aclose()
        app.state.records.client.close()
        app.state.queue.close()

    app = FastAPI(
        title="videoqa", version="0.1.0", summary="Question answering over long videos.", lifespan=lifespan,
        generate_unique_id_function=lambda route: f"{route.tags[0]}-{route.name}",  # readable client methods
    )  # fmt: skip
    app.state.settings = settings
    app.state.tenants_by_key = settings.tenants_by_key()
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
    )  # connects on first use, not here
    app.state.records = Records(client, settings.keys)
    app.state.queue = TaskQueue(settings, Router(client, settings.keys, settings))
    app.state.metrics = Metrics(app.state.records)
    app.state.media_tokens = MediaTokens(settings)
    app.state.conversations = Conversations(app.state.records)
    app.state.downloads = Downloads(settings, app.state.records, app.state.queue)

    for router in (
        videos.router,
        media.router,
        asks.router,
        conversations.router,
        jobs.router,
        health.router,
        models.router,
        files.router,
        chat.router,
    ):
        app.include_router(router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware, streamed=frozenset({("POST", "/videos"), ("POST", "/v1/files")}),
        larger={("POST", "/v1/chat/completions"): settings.max_chat_body_bytes},
    )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(HeadMiddleware)
    if origins := settings.cors_origin_list():
        app.add_middleware(
            JSONCORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=["Location", "Retry-After"],
        )  # fmt: skip
    return app


app = create_app()
