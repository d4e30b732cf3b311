"""Videos given by URL instead of uploaded: a data: URL's bytes, or a download over http(s) through the SSRF
guard (service/url_guard.py), stored as an upload is (size cap, sniffing, hashing, the same temporary file).

A download follows at most MAX_REDIRECTS redirects, checking each; it is refused before reading when its
Content-Length passes the upload cap, and stopped when the body passes it, when nothing arrives for
VIDEOQA_UPLOAD_IDLE_TIMEOUT_SECONDS or when it takes longer than VIDEOQA_URL_TIMEOUT_SECONDS. Errors:
url_forbidden, url_unreachable, url_too_large, url_timeout, unsupported_media (400, 413 or 415, 504).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from urllib.parse import urljoin

import anyio
import httpx

from service.contract import Settings
from service.errors import APIError
from service.uploads import ReceivedUpload, incoming_dir, receive_file, safe_filename
from service.url_guard import check_url, parse_networks

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
# The upload's errors, as a download's.
_AS_URL_ERROR = {"payload_too_large": "url_too_large", "unsupported_media_type": "unsupported_media",
                 "upload_timeout": "url_timeout", "empty_upload": "unsupported_media"}  # fmt: skip


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


async def download(url: str, settings: Settings) -> ReceivedUpload:
    """The video at an http(s) URL, stored as an upload (see the module's docstring)."""
    try:
        with anyio.fail_after(settings.url_timeout_seconds):
            return await _download(url, settings)
    except TimeoutError:
        raise _url_timeout(f"the download took longer than {settings.url_timeout_seconds:g} s") from None
    except httpx.TimeoutException as exc:
        raise _url_timeout(f"the server stopped answering ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise APIError(400, "url_unreachable", f"could not fetch the URL: {exc}", param="url") from None
    except APIError as exc:
        if code := _AS_URL_ERROR.get(exc.code):
            status = 504 if code == "url_timeout" else exc.status_code
            raise APIError(status, code, exc.message, param="url") from None
        raise


async def _download(url: str, settings: Settings) -> ReceivedUpload:
    allowed = parse_networks(settings.url_allowed_networks)
    timeout = httpx.Timeout(settings.upload_idle_timeout_seconds, connect=CONNECT_TIMEOUT_S)
    # trust_env=False: no proxy from the environment, which would connect to the host by name itself
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = await check_url(url, allowed)
            request = client.build_request("GET", **target.request_options())
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    continue
                return await _store(response, url, settings)
            finally:
                await response.aclose()
    raise APIError(400, "url_unreachable", f"more than {MAX_REDIRECTS} redirects", param="url")


async def _store(response: httpx.Response, url: str, settings: Settings) -> ReceivedUpload:
    if response.status_code != 200:
        raise APIError(400, "url_unreachable", f"the server answered {response.status_code}", param="url")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise APIError(413, "url_too_large", f"the video is {declared} bytes, more than the limit of "
                       f"{settings.max_upload_bytes}", param="url")  # fmt: skip
    name = safe_filename(httpx.URL(url).path.encode()) if httpx.URL(url).path.strip("/") else "video"
    return await receive_file(response.aiter_bytes(), filename=name, directory=incoming_dir(settings),
                              max_bytes=settings.max_upload_bytes,
                              idle_timeout=settings.upload_idle_timeout_seconds)  # fmt: skip


def _url_timeout(message: str) -> APIError:
    return APIError(504, "url_timeout", message, param="url")
