"""A 1 GB upload played through the real API process (uvicorn over HTTP): streamed from disk, so the API's
memory stays flat, and a seek lands on the right bytes."""

import time

import httpx
import pytest
import redis

from service.contract import Keys
from service.records import Records
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow

GB = 1024**3
MARKER_AT = 700_000_000
MARKER = b"this is byte 700000000"


def rss_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start) of a process, in KiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.fixture
def api(tmp_path, redis_url):
    (tmp_path / "logs").mkdir()
    stack = Stack(redis_url, tmp_path / "data", tmp_path / "no-model", tmp_path / "logs")
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def test_a_1_gb_video_streams_with_flat_api_memory_and_seeks(api, tmp_path, redis_url):
    path = tmp_path / "data" / "uploads" / "big.mp4"
    path.parent.mkdir(parents=True)
    with path.open("wb") as file:  # sparse: 1 GB on the volume without writing 1 GB
        file.write(b"\x00\x00\x00\x18ftypisom")
        file.seek(MARKER_AT)
        file.write(MARKER)
        file.truncate(GB)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    video, _ = Records(client, Keys()).create_video(
        tenant="public", sha256="0" * 64, filename="big.mp4", size_bytes=GB, path=str(path), container="mp4"
    )
    client.close()
    url = f"{api.base_url}/videos/{video['id']}/content"

    seek = httpx.get(url, headers={"Range": f"bytes={MARKER_AT}-{MARKER_AT + len(MARKER) - 1}"})
    assert seek.status_code == 206 and seek.content == MARKER
    assert seek.headers["content-range"] == f"bytes {MARKER_AT}-{MARKER_AT + len(MARKER) - 1}/{GB}"

    pid = api.api.pid
    before = rss_kib(pid, "VmRSS")
    received, started = 0, time.monotonic()
    with httpx.stream("GET", url, timeout=120) as response:
        assert response.status_code == 200 and int(response.headers["content-length"]) == GB
        for chunk in response.iter_bytes(1024 * 1024):
            received += len(chunk)
    peak = rss_kib(pid, "VmHWM")
    seconds = time.monotonic() - started
    print(f"1 GB in {seconds:.1f}s; API RSS {before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB")
    assert received == GB
    assert peak - before < 64 * 1024  # KiB: far below the file's size, whatever the OS page cache holds
