"""What a browser's <video> and <img> elements need: media types, and signed URLs instead of a header.

A `<video src>` cannot send `Authorization: Bearer`, so an authenticated call mints a token for one video:
`<expiry unix seconds>.<HMAC-SHA256(secret, video_id:expiry)>`, accepted as `?token=` by the content and
frame routes until it expires. The secret is `VIDEOQA_MEDIA_TOKEN_SECRET`, or derived from the API keys,
so every replica configured alike accepts every replica's tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from service.contract import Settings

# Sniffed container (service.uploads.sniff_container) -> Content-Type the browser plays it as.
MEDIA_TYPES = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "webm": "video/webm",
    "avi": "video/x-msvideo",
    "flv": "video/x-flv",
    "ogg": "video/ogg",
    "asf": "video/x-ms-asf",
    "mpeg": "video/mpeg",
    "mxf": "application/mxf",
    "rm": "application/vnd.rn-realmedia",
    "mpegts": "video/mp2t",
    "m2ts": "video/mp2t",
}


def media_type(container: str | None) -> str:
    return MEDIA_TYPES.get(container or "", "application/octet-stream")


class MediaTokens:
    """Mints and checks the signed, expiring tokens for one video's content and frames."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.media_token_secret or "videoqa-media-token:" + settings.api_keys
        self._secret = hashlib.sha256(secret.encode()).digest()
        self.lifetime = settings.media_token_seconds

    def mint(self, video_id: str, now: float | None = None) -> tuple[str, int]:
        """-> (token, expiry in unix seconds)."""
        expires = int(now if now is not None else time.time()) + self.lifetime
        return f"{expires}.{self._sign(video_id, expires)}", expires

    def valid(self, token: str, video_id: str, now: float | None = None) -> bool:
        expires, _, signature = token.partition(".")
        if not expires.isdigit() or int(expires) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(signature, self._sign(video_id, int(expires)))

    def _sign(self, video_id: str, expires: int) -> str:
        digest = hmac.new(self._secret, f"{video_id}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
