"""Factories for the API tier's tests: upload bodies and queue inspection. Torch- and PyAV-free, like
the tier they test (tests/helpers.py encodes videos with PyAV, which the API image does not have)."""

import base64
import json
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

from service.contract import GPU_QUEUE


def fake_mp4(seed: int = 0, size: int = 2048) -> bytes:
    """Bytes that sniff as MP4 (an ftyp box), distinct per seed: for tests that never decode."""
    ftyp = struct.pack(">I", 24) + b"ftypisom" + b"\x00\x00\x02\x00" + b"isomiso2"
    return ftyp + seed.to_bytes(8, "big") + bytes(size - len(ftyp) - 8)


def m4a_header() -> bytes:
    """The start of an audio-only MPEG-4 file (brand M4A): ISO-BMFF, so the API accepts it."""
    return struct.pack(">I", 28) + b"ftypM4A " + b"\x00\x00\x00\x00" + b"M4A isommp42" + bytes(4000)


def wav_header() -> bytes:
    """The start of a WAV file: RIFF, but not AVI."""
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    return b"RIFF" + struct.pack("<I", 4036) + b"WAVE" + fmt + b"data" + struct.pack("<I", 4000) + bytes(4000)


def queued_tasks(redis_url: str) -> list[tuple[str, list, str]]:
    """(task name, args, task id) of every message waiting in the GPU queue, oldest first.

    Celery's Redis transport LPUSHes JSON messages onto a list named after the queue; the task name is in
    the message headers (protocol 2) and the body is base64 JSON [args, kwargs, embed].
    """
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        raw = client.lrange(GPU_QUEUE, 0, -1)
    finally:
        client.close()
    tasks = []
    for message in reversed(raw):
        envelope = json.loads(message)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        tasks.append((envelope["headers"]["task"], args, envelope["headers"]["id"]))
    return tasks


class LoopbackServer:
    """A real HTTP server on a loopback address (127.0.0.0/8 only) in a thread, for the service to fetch from
    or deliver to. `handle(handler)` answers each request (a BaseHTTPRequestHandler: path, headers, body in
    `handler.body`); the server counts the connections it accepted and keeps every request it read."""

    def __init__(
        self, handle: Callable[[BaseHTTPRequestHandler], None], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        assert host.startswith("127."), "tests talk to loopback addresses only"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("content-length") or 0)
                self.body = self.rfile.read(length) if length else b""
                owner.requests.append((self.command, self.path, dict(self.headers), self.body))
                handle(self)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                owner.connections += 1
                return True

        self.connections = 0
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.server = Server((host, port), Handler)
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None):
    """Answer `handler`'s request with `status`, `body` and `headers`."""
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def wait_for(condition: Callable, timeout: float = 10, poll: float = 0.05):
    """`condition()`'s first truthy value, asked every `poll` seconds; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)
    return value
