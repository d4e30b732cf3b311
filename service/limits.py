"""Request body limits, answered with the JSON error body (Starlette's own limit answers in plain text)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

MAX_BODY_BYTES = 1 << 20  # a question is at most a few kB: never read a huge JSON (or form) body into memory


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 payload_too_large, except the routes listed in
    `streamed` ((method, path) pairs: the video uploads, which stream to disk under their own limit) and
    those given a limit of their own in `larger` ((method, path) -> bytes: a chat that inlines its video)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, streamed: frozenset = frozenset(),
        larger: dict[tuple[str, str], int] | None = None,
    ):  # fmt: skip
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope.get("method"), scope.get("path", "").rstrip("/"))
        if scope["type"] != "http" or route in self.streamed:
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(route, self.max_bytes)
        message = f"the request body is larger than {limit} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, "payload_too_large", message, path=scope["path"])
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:  # chunked, no Content-Length: stop reading here
                    raise HTTPException(413, message)
            return event

        await self.app(scope, receive_within_limit, send)
