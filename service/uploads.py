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
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.contract import STORAGE_FULL_ERRNOS, Settings
from service.errors import APIError

FILE_FIELD = "file"
SNIFF_BYTES = 4096
WRITE_BATCH_BYTES = 1 << 20
MULTIPART_SLACK_BYTES = 1 << 20  # Content-Length above max_upload_bytes + this: refuse before reading

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

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.container]


def safe_filename(raw: bytes) -> str:
    """The client's file name as metadata only: its last path component, printable, at most 255 chars."""
    name = raw.decode("utf-8", errors="replace").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:255] or "upload"


class _Receiver:
    """python-multipart callbacks: collects the `file` part into a batch the caller flushes to disk."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.in_file = False  # inside the first part named "file" that has a filename
        self.file_seen = False
        self.file_done = False
        self.filename = ""
        self.size = 0
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
        if options.get(b"name") == FILE_FIELD.encode() and b"filename" in options and not self.file_seen:
            self.in_file = self.file_seen = True
            self.filename = safe_filename(options[b"filename"])

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.in_file:
            return  # other form fields are ignored, never buffered
        self.size += end - start
        if self.size > self.max_bytes:
            raise _TooLarge
        self.batch += data[start:end]

    def on_part_end(self) -> None:
        if self.in_file:
            self.in_file, self.file_done = False, True


class _TooLarge(Exception):
    pass


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


async def receive_upload(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str,
    content_length: str | None,
    directory: Path,
    max_bytes: int,
    idle_timeout: float = 60.0,
) -> ReceivedUpload:
    """Stream the multipart field `file` into a new file under `directory`; hash, size-check, sniff.

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

    receiver = _Receiver(max_bytes)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sink = _FileSink(directory / f"{secrets.token_hex(16)}.part")
    except OSError as exc:
        if exc.errno in STORAGE_FULL_ERRNOS:
            raise _storage_full() from exc
        raise
    container: str | None = None
    try:
        try:
            async for chunk in _with_idle_timeout(chunks, idle_timeout):
                parser.write(chunk)
                if len(receiver.batch) >= max(SNIFF_BYTES, WRITE_BATCH_BYTES if container else 0):
                    container = container or _sniff_or_refuse(receiver.batch)
                    await _flush(receiver, sink)
            parser.finalize()
        except _TooLarge:
            raise _too_large(max_bytes) from None
        except FormParserError as exc:
            raise APIError(400, "invalid_multipart", "the multipart body is malformed") from exc
        if not receiver.file_seen:
            raise APIError(422, "missing_file", f"the multipart field {FILE_FIELD!r} (a file) is required")
        if not receiver.file_done:
            raise APIError(400, "invalid_multipart", "the multipart body ended inside the file")
        if receiver.size == 0:
            raise APIError(400, "empty_upload", "the uploaded file is empty")
        container = container or _sniff_or_refuse(receiver.batch)
        await _flush(receiver, sink)
        await sink.close()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await sink.close()
        sink.path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
            raise _storage_full() from exc
        raise
    return ReceivedUpload(sink.path, receiver.filename, receiver.size, sink.hash.hexdigest(), container)


async def _flush(receiver: _Receiver, sink: _FileSink) -> None:
    batch, receiver.batch = bytes(receiver.batch), bytearray()
    if batch:
        await sink.write(batch)


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
