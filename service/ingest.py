"""Videos given by URL instead of uploaded: a data: URL's bytes, stored as an upload is."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator

from service.contract import Settings
from service.errors import APIError
from service.uploads import ReceivedUpload, incoming_dir, receive_file


async def receive_data_url(url: str, settings: Settings) -> ReceivedUpload:
    """`data:<media type>;base64,<bytes>` stored under the upload's limits, sniffing and errors (the request
    body's own limit, VIDEOQA_MAX_CHAT_BODY_BYTES, bounds what is decoded here)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, "invalid_data_url", "a data: URL must be data:<type>;base64,<bytes>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid_data_url", "the data: URL is not valid base64") from None

    async def one_chunk() -> AsyncIterator[bytes]:
        yield data

    return await receive_file(one_chunk(), filename="video", directory=incoming_dir(settings),
                              max_bytes=settings.max_upload_bytes)  # fmt: skip
