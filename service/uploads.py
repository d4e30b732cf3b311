"""Streamed multipart uploads: the request body goes to disk as it arrives, hashed on the way.

We parse the request stream ourselves (python-multipart's push parser) rather than take an UploadFile:
Starlette's form parser spools every file into a temporary file that we would then copy again to its final
place, and only after the whole body arrived could we enforce the size limit. Here memory holds at most
one write batch (1 MiB), the size limit stops the read the moment it is passed, the container is sniffed
from the first bytes before anything big is written, and the finished file is renamed into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.contract import STORAGE_FULL_ERRNOS, Settings
from service.errors import APIError
from service.limits import MAX_BODY_BYTES

ModelT = TypeVar("ModelT", bound=BaseModel)
FILE_FIELD = "file"
SNIFF_BYTES = 4096
WRITE_BATCH_BYTES = 1 << 20
MULTIPART_SLACK_BYTES = 1 << 20  # Content-Length above max_upload_bytes + this: refuse before reading
MAX_FIELDS, MAX_FIELD_BYTES = 16, 4096  # the form's text fields kept beside the file (purpose, ...)

# The extension a stored upload gets, by sniffed container.
EXTENSIONS = {
    "mp4": "mp4", "mov": "mov", "mkv": "mkv", "webm": "webm", "avi": "avi", "flv": "flv", "ogg": "ogg",
    "asf": "asf", "mpegts": "ts", "m2ts": "m2ts", "mpeg": "mpg", "mxf": "mxf", "rm": "rm",
}  # fmt: skip

_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def sniff_container(head: bytes) -> str | None:
    """The container format from a file's first bytes (never its name), or None when it is no video container.

    Audio-only files in a video container (an .m4a is ISO-BMFF, an .ogg may hold only Vorbis) pass: telling
    them apart needs a demuxer, and the worker fails them with a typed error. Bare audio (WAV, MP3, FLAC)
    and everything else is refused here.
    """
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if len(head) >= 8 and head[4:8] in _QUICKTIME_ATOMS:
        return "mov"  # old QuickTime files start with a movie or data atom, no ftyp
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: the DocType says matroska or webm
        return "webm" if b"webm" in head[:64] else "mkv"
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(_ASF_GUID):
        return "asf"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"  # MPEG program stream (VOB, .mpg)
    if head.startswith(b"\x06\x0e\x2b\x34"):
        return "mxf"
    if head.startswith(b".RMF"):
        return "rm"
    # MPEG transport streams: a 0x47 sync byte every 188 bytes (192 in M2TS, after a 4-byte timecode).
    # One sync byte is a "G"; three in a row at the packet stride is a transport stream.
    if len(head) > 2 * 188 and all(head[i] == 0x47 for i in range(0, min(len(head), 5 * 188), 188)):
        return "mpegts"
    if len(head) > 4 + 2 * 192 and all(head[i] == 0x47 for i in range(4, min(len(head), 5 * 192), 192)):
        return "m2ts"
    return None


def upload_body(
    json_schema: dict | None = None, optional: frozenset[str] = frozenset(), **fields: dict
) -> dict:
    """The OpenAPI `openapi_extra` of a multipart upload route: the file, and these text fields (JSON
    Schemas by name, required unless `optional`); with `json_schema`, the JSON body the route also takes."""
    properties = {FILE_FIELD: {"type": "string", "format": "binary"}, **fields}
    required = [name for name in properties if name not in optional]
    schema = {"type": "object", "required": required, "properties": properties}
    content = {"multipart/form-data": {"schema": schema}}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    """A small JSON body (at most MAX_BODY_BYTES) on a route that streams its uploads, as `model`; errors as
    FastAPI's own body validation reports them."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(
                413, "payload_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
            )
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


def incoming_dir(settings: Settings) -> Path:
    """Where uploads are written while they arrive: on the uploads volume, so the final rename is atomic."""
    return settings.uploads_dir / ".incoming"


@dataclass
class ReceivedUpload:
    path: Path  # a temporary file next to the final place: the caller renames or deletes it
    filename: str
    size_bytes: int
    sha256: str
    container: str
    fields: dict[str, str] = field(default_factory=dict)  # the form's small text fields (purpose, ...)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.container]


def safe_filename(raw: bytes) -> str:
    """The client's file name as metadata only: its last path component, printable, at most 255 chars."""
    name = raw.decode("utf-8", errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:255] or "upload"


class _Receiver:
    """python-multipart callbacks: collects the `file` part into a batch the caller takes, and the small text
    fields beside it (at most MAX_FIELDS of MAX_FIELD_BYTES each; longer ones are cut, more are dropped)."""

    def __init__(self) -> None:
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.in_file = False  # inside the first part named "file" that has a filename
        self.file_seen = False
        self.file_done = False
        self.filename = ""
        self.field: str | None = None  # the text field being read
        self.fields: dict[str, bytearray] = {}
        self.batch = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._add(data[start:end], value=False),
            "on_header_value": lambda data, start, end: self._add(data[start:end], value=True),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def take(self) -> bytes:
        """The file bytes received since the last call."""
        batch, self.batch = bytes(self.batch), bytearray()
        return batch

    def text_fields(self) -> dict[str, str]:
        return {name: value.decode("utf-8", errors="replace") for name, value in self.fields.items()}

    def _add(self, data: bytes, *, value: bool) -> None:
        if value:
            self.header_value += data
        else:
            self.header_name += data

    def on_part_begin(self) -> None:
        self.disposition = b""

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name", b"")
        if name == FILE_FIELD.encode() and b"filename" in options and not self.file_seen:
            self.in_file = self.file_seen = True
            self.filename = safe_filename(options[b"filename"])
        elif b"filename" not in options and len(self.fields) < MAX_FIELDS:
            self.field = name.decode("utf-8", errors="replace")
            self.fields.setdefault(self.field, bytearray())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.batch += data[start:end]
        elif self.field is not None:
            value = self.fields[self.field]
            value += data[start : min(end, start + MAX_FIELD_BYTES - len(value))]

    def on_part_end(self) -> None:
        if self.in_file:
            self.in_file, self.file_done = False, True
        self.field = None


class _FileSink:
    """The temporary file and the running hash, fed from a worker thread one batch at a time. A batch is
    hashed and written while the next one is received (at most one in flight): taking turns left the
    upload at a third of what hashing and writing alone can do."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.file = open(path, "xb")  # closed in close(): the upload spans many awaits
        self._pending: asyncio.Future | None = None

    async def write(self, data: bytes) -> None:
        await self.drain()
        self._pending = asyncio.ensure_future(anyio.to_thread.run_sync(self._write, data))

    async def drain(self) -> None:
        """Wait for the batch in flight, if any (its errors surface here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _write(self, data: bytes) -> None:
        self.hash.update(data)  # releases the GIL for big buffers
        self.file.write(data)

    async def close(self) -> None:
        try:
            await asyncio.shield(self.drain())  # the thread finishes with the file before it is closed
        finally:
            self.file.close()


class _Spool:
    """A video's bytes on their way to disk: size-capped, sniffed from the first bytes before anything big
    is written, hashed and written in batches."""

    def __init__(self, sink: _FileSink, max_bytes: int) -> None:
        self.sink, self.max_bytes = sink, max_bytes
        self.size = 0
        self.container: str | None = None
        self.batch = bytearray()

    async def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise _too_large(self.max_bytes)
        self.batch += data
        if len(self.batch) >= max(SNIFF_BYTES, WRITE_BATCH_BYTES if self.container else 0):
            self.container = self.container or _sniff_or_refuse(self.batch)
            await self._flush()

    async def finish(self) -> str:
        """Write what is left and close the file -> the container."""
        if self.size == 0:
            raise APIError(400, "empty_upload", "the uploaded file is empty")
        self.container = self.container or _sniff_or_refuse(self.batch)
        await self._flush()
        await self.sink.close()
        return self.container

    def received(self, filename: str, fields: dict[str, str] | None = None) -> ReceivedUpload:
        return ReceivedUpload(self.sink.path, filename, self.size, self.sink.hash.hexdigest(),
                              self.container or "", fields or {})  # fmt: skip

    async def _flush(self) -> None:
        batch, self.batch = bytes(self.batch), bytearray()
        if batch:
            await self.sink.write(batch)


@contextlib.asynccontextmanager
async def _spooling(directory: Path, max_bytes: int) -> AsyncIterator[_Spool]:
    """A spool into a new file under `directory`, deleted when the block fails (507 when the volume is
    full)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sink = _FileSink(directory / f"{secrets.token_hex(16)}.part")
    except OSError as exc:
        if exc.errno in STORAGE_FULL_ERRNOS:
            raise _storage_full() from exc
        raise
    try:
        yield _Spool(sink, max_bytes)
    except BaseException as exc:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # also when cancelled
            await sink.close()
        sink.path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
            raise _storage_full() from exc
        raise


async def receive_upload(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str,
    content_length: str | None,
    directory: Path,
    max_bytes: int,
    idle_timeout: float = 60.0,
) -> ReceivedUpload:
    """Stream the multipart field `file` into a new file under `directory`; hash, size-check, sniff. The
    form's other (text) fields come back in `fields`.

    Raises APIError: 415 multipart_required / unsupported_media_type, 413 payload_too_large, 400
    empty_upload / invalid_multipart, 422 missing_file, 408 upload_timeout (nothing arrived for
    `idle_timeout` seconds), 507 storage_full (the volume is full). The partial file is deleted on every
    error.
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or b"boundary" not in params:
        message = f"send the video as multipart/form-data, field {FILE_FIELD!r}"
        raise APIError(415, "multipart_required", message)
    if (
        content_length
        and content_length.isdigit()
        and int(content_length) - MULTIPART_SLACK_BYTES > max_bytes
    ):
        raise _too_large(max_bytes)

    receiver = _Receiver()
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    async with _spooling(directory, max_bytes) as spool:
        try:
            async for chunk in _with_idle_timeout(chunks, idle_timeout):
                parser.write(chunk)
                await spool.feed(receiver.take())
            parser.finalize()
        except FormParserError as exc:
            raise APIError(400, "invalid_multipart", "the multipart body is malformed") from exc
        if not receiver.file_seen:
            raise APIError(422, "missing_file", f"the multipart field {FILE_FIELD!r} (a file) is required")
        if not receiver.file_done:
            raise APIError(400, "invalid_multipart", "the multipart body ended inside the file")
        await spool.feed(receiver.take())
        await spool.finish()
    return spool.received(receiver.filename, receiver.text_fields())


async def receive_request_upload(request: Request, settings: Settings) -> ReceivedUpload:
    """`receive_upload` of a request's body, under the configured limits."""
    return await receive_upload(
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        content_length=request.headers.get("content-length"),
        directory=incoming_dir(settings),
        max_bytes=settings.max_upload_bytes,
        idle_timeout=settings.upload_idle_timeout_seconds,
    )


async def receive_file(
    chunks: AsyncIterator[bytes],
    *,
    filename: str,
    directory: Path,
    max_bytes: int,
    idle_timeout: float = 60.0,
) -> ReceivedUpload:
    """Store a stream that is the video itself (a data: URL's bytes, a download) as `receive_upload` stores
    a multipart upload, with the same checks and errors."""
    async with _spooling(directory, max_bytes) as spool:
        async for chunk in _with_idle_timeout(chunks, idle_timeout):
            await spool.feed(chunk)
        await spool.finish()
    return spool.received(filename)


def _sniff_or_refuse(head: bytearray) -> str:
    container = sniff_container(bytes(head[:SNIFF_BYTES]))
    if container is None:
        raise APIError(415, "unsupported_media_type", "the file is not a video container this service reads "
                       "(MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg, ASF, MXF)")  # fmt: skip
    return container


async def _with_idle_timeout(chunks: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes]:
    """The chunks, or 408 upload_timeout once none arrived for `seconds`: a client that stops sending must
    not hold a connection and a partial file forever (uvicorn has no read timeout of its own)."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            message = f"the upload sent nothing for {seconds:g} seconds"
            raise APIError(408, "upload_timeout", message, headers={"Connection": "close"}) from None
        yield chunk


def _storage_full() -> APIError:
    message = "the server's storage is full; try again later"
    return APIError(507, "storage_full", message, headers={"Retry-After": "60"})


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, "payload_too_large", f"the upload is larger than the limit of {max_bytes} bytes")


def sweep_incoming(directory: Path, older_than_s: float = 3600) -> int:
    """Delete temporary upload files a crashed process left behind -> how many. Only old ones: another API
    replica sharing the volume may be writing a fresh one right now."""
    if not directory.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    stale = [path for path in directory.glob("*.part") if path.stat().st_mtime < cutoff]
    for path in stale:
        remove_quietly(path)
    return len(stale)


def remove_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
