"""HTTP conformance the framework leaves out: HEAD on every GET route and CORS refusals in the JSON error
body (the truthful `Allow` of a 405 is in service/errors.py)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response


class HeadMiddleware:
    """Answer HEAD as the GET of the same URL would, without its body (RFC 9110 section 9.3.2).

    FastAPI routes a HEAD only where a route declares it, so HEAD /healthz was a 405. Here the request runs
    as a GET; once the response's headers are sent the body is dropped, and the route is told that the
    client went away, so a stream (Server-Sent Events) stops instead of running on unseen."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        started = False

        async def receive_until_started() -> Message:
            if started:
                return {"type": "http.disconnect"}
            return await receive()

        async def send_headers_only(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            # the body (and any later part of it) is not sent

        await self.app({**scope, "method": "GET"}, receive_until_started, send_headers_only)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the JSON error body (it answers text/plain)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        skip = ("content-length", "content-type")
        headers = {name: value for name, value in response.headers.items() if name.lower() not in skip}
        return error_response(400, "cors_rejected", response.body.decode(), headers)
