"""Request body limits, answered with the JSON error body (Starlette's own limit answers in plain text)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

MAX_BODY_BYTES = 1 << 20  # a question is at most a few kB: never read a huge JSON (or form) body into memory


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 payload_too_large, except the routes listed in
    `streamed` ((method, path) pairs: the video upload, which streams to disk under its own limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, streamed: frozenset = frozenset()):
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in self.streamed:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "payload_too_large", self._message())
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked, no Content-Length: stop reading here
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, receive_within_limit, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"
