"""Videos by URL and the SSRF guard. Every connection here goes to a loopback address (127.0.0.0/8): servers
of the test's own on 127.0.0.1 (allowed by VIDEOQA_URL_ALLOWED_NETWORKS) and 127.0.0.2 (not allowed).
Addresses that must be refused elsewhere (private, link-local, ...) are judged by the guard alone, with
every socket connection made to fail the test: nothing is ever sent to them."""

import asyncio
import json
import socket
import time
from ipaddress import ip_address

import pytest

from service.contract import Settings
from service.errors import APIError
from service.ingest import MAX_REDIRECTS, download
from service.url_guard import check_url, parse_networks, refusal
from tests.service.conftest import ALICE, ALICE_KEY
from tests.service.helpers import LoopbackServer, fake_mp4, reply, wait_for

ALLOWED = "127.0.0.1/32"
VIDEO = fake_mp4(21, size=64 * 1024)


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to open a TCP connection fails the test."""
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def routes(handler, trickle_s: float = 0.3):
    """The test server: /video.mp4, /text, /big (declares 10 MB), /trickle (a byte at a time), /missing,
    /to?<url> (a redirect), /loop (redirects to itself)."""
    path, _, query = handler.path.partition("?")
    if path == "/video.mp4":
        reply(handler, 200, VIDEO, {"Content-Type": "video/mp4"})
    elif path == "/text":
        reply(handler, 200, b"<html>not a video</html>" * 300, {"Content-Type": "text/html"})
    elif path == "/big":
        handler.send_response(200)
        handler.send_header("Content-Length", str(10 * 1024 * 1024))
        handler.end_headers()
        handler.wfile.write(VIDEO[:1024])
    elif path == "/trickle":
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(VIDEO)))
        handler.end_headers()
        for byte in VIDEO[:200]:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(trickle_s)
    elif path == "/to":
        reply(handler, 302, headers={"Location": query})
    elif path == "/loop":
        reply(handler, 302, headers={"Location": "/loop"})
    else:
        reply(handler, 404, b"no")


@pytest.fixture
def servers():
    """(allowed server on 127.0.0.1, refused server on 127.0.0.2)."""
    with LoopbackServer(routes) as allowed, LoopbackServer(routes, host="127.0.0.2") as refused:
        yield allowed, refused


def settings_for(tmp_path, **overrides) -> Settings:
    values = {"url_allowed_networks": ALLOWED, "max_upload_bytes": 1024 * 1024, "url_timeout_seconds": 10,
              "upload_idle_timeout_seconds": 5, **overrides}  # fmt: skip
    return Settings(data_dir=tmp_path / "data", **values)


def fetch(url: str, settings: Settings):
    return asyncio.run(download(url, settings))


def settled(client, video_id: str) -> dict | None:
    """The video once it is no longer downloading."""
    video = client.get(f"/videos/{video_id}", headers=ALICE).json()
    return None if video["status"] == "downloading" else video


def incoming(settings: Settings) -> list:
    directory = settings.uploads_dir / ".incoming"
    return list(directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
     "240.0.0.1", "255.255.255.255", "127.0.0.1", "127.0.0.2", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
     "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:127.0.0.1", "2002:a00:1::", "64:ff9b::a00:1",
     "2001:db8::1"],
)  # fmt: skip
def test_the_guard_refuses_every_non_public_address(address):
    assert refusal(ip_address(address)) is not None


def test_the_guard_admits_public_addresses_and_allowed_networks():
    assert refusal(ip_address("93.184.215.14")) is None  # judged only: nothing connects to it
    assert refusal(ip_address("2606:4700::1111")) is None
    allowed = parse_networks("127.0.0.1/32, 10.9.0.0/16")
    assert (
        refusal(ip_address("127.0.0.1"), allowed) is None and refusal(ip_address("10.9.3.4"), allowed) is None
    )
    assert refusal(ip_address("127.0.0.2"), allowed) is not None  # only what the networks hold


@pytest.mark.parametrize(
    "url",
    ["http://10.1.2.3/v.mp4", "http://169.254.169.254/latest/meta-data/", "https://[fe80::1]/v.mp4",
     "http://[::ffff:192.168.0.1]:8080/v.mp4", "http://0x7f000002/v.mp4", "http://localhost:1/v.mp4",
     "ftp://example.com/v.mp4", "file:///etc/passwd", "http:///nohost"],
)  # fmt: skip
def test_a_refused_url_is_refused_before_any_connection(url, tmp_path, no_connections):
    with pytest.raises(APIError) as refused:
        fetch(url, settings_for(tmp_path, url_allowed_networks=""))
    assert refused.value.code in ("url_forbidden", "url_unreachable")
    assert no_connections == []


def test_a_video_on_an_allowed_network_is_stored_as_an_upload(servers, tmp_path):
    allowed, _ = servers
    settings = settings_for(tmp_path)
    upload = fetch(allowed.url("/video.mp4"), settings)
    assert upload.path.read_bytes() == VIDEO and upload.container == "mp4" and upload.filename == "video.mp4"
    assert upload.size_bytes == len(VIDEO)
    [(_, _, headers, _)] = allowed.requests
    assert headers["Host"] == f"127.0.0.1:{allowed.port}"


def test_an_address_outside_the_allowed_networks_gets_no_connection(servers, tmp_path):
    allowed, refused = servers
    settings = settings_for(tmp_path)
    with pytest.raises(APIError) as direct:
        fetch(refused.url("/video.mp4"), settings)
    assert direct.value.code == "url_forbidden"
    with pytest.raises(APIError) as redirected:
        fetch(allowed.url("/to?" + refused.url("/video.mp4")), settings)
    assert redirected.value.code == "url_forbidden"
    assert [path for _, path, _, _ in allowed.requests] == ["/to?" + refused.url("/video.mp4")]
    assert refused.connections == 0 and refused.requests == []
    assert incoming(settings) == []


def test_bad_downloads_fail_with_their_codes_and_leave_nothing(servers, tmp_path):
    allowed, _ = servers
    settings = settings_for(tmp_path, url_timeout_seconds=2)
    cases = {"/text": "unsupported_media", "/big": "url_too_large", "/missing": "url_unreachable",
             "/loop": "url_unreachable", "/trickle": "url_timeout"}  # fmt: skip
    for path, code in cases.items():
        started = time.monotonic()
        with pytest.raises(APIError) as failed:
            fetch(allowed.url(path), settings)
        assert failed.value.code == code, (path, failed.value.message)
        assert time.monotonic() - started < 5, path  # the trickle is cut at the time cap
    assert sum(path == "/loop" for _, path, _, _ in allowed.requests) == MAX_REDIRECTS + 1
    assert incoming(settings) == []


def test_post_videos_with_a_url_shows_downloading_then_indexes(make_client, records, servers):
    allowed, _ = servers
    client = make_client(api_keys=f"{ALICE_KEY}:alice", url_allowed_networks=ALLOWED)
    slow = LoopbackServer(lambda handler: (time.sleep(1.0), routes(handler)))
    with slow:
        response = client.post("/videos", json={"url": slow.url("/video.mp4")}, headers=ALICE)
        assert response.status_code == 202, response.text
        video = response.json()
        assert video["status"] == "downloading" and video["links"]["index_job"] is None
        assert client.get(f"/videos/{video['id']}", headers=ALICE).json()["status"] == "downloading"
        current = wait_for(lambda: settled(client, video["id"]))
    assert current["status"] == "queued" and current["size_bytes"] == len(VIDEO)
    assert current["filename"] == "video.mp4" and current["links"]["index_job"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [({"url": "REFUSED/v.mp4"}, 400, "url_forbidden"), ({"url": "ftp://x/v.mp4"}, 400, "url_forbidden"),
     ({"url": 5}, 422, "validation_error"), ({"link": "http://x"}, 422, "validation_error"),
     ("{not json", 400, "malformed_json")],
)  # fmt: skip
def test_post_videos_refuses_bad_urls_at_submission(make_client, servers, body, status, code):
    _, refused = servers
    client = make_client(api_keys=f"{ALICE_KEY}:alice", url_allowed_networks=ALLOWED)
    if isinstance(body, dict) and isinstance(body.get("url"), str):
        body = {"url": body["url"].replace("REFUSED", refused.url("").rstrip("/"))}
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/videos", content=content, headers={**ALICE, "Content-Type": "application/json"})
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert client.get("/videos", headers=ALICE).json()["total"] == 0
    assert refused.connections == 0


def test_a_failed_download_fails_its_video_with_the_code(make_client, servers):
    allowed, _ = servers
    client = make_client(api_keys=f"{ALICE_KEY}:alice", url_allowed_networks=ALLOWED)
    video = client.post("/videos", json={"url": allowed.url("/text")}, headers=ALICE).json()
    current = wait_for(lambda: settled(client, video["id"]))
    assert current["status"] == "failed" and current["error"]["code"] == "unsupported_media"


def test_chat_with_an_http_video_url_and_a_refused_one(make_client, servers):
    import openai

    allowed, refused = servers
    app = make_client(api_keys=f"{ALICE_KEY}:alice", url_allowed_networks=ALLOWED, served_model_name="m",
                      chat_wait_seconds=0.2)  # fmt: skip
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=ALICE_KEY, http_client=app, max_retries=0)

    def chat(url: str):
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi?"}]
        return sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": content}])

    with pytest.raises(openai.APIStatusError) as waited:  # ingested; nothing answers here: a timeout
        chat(allowed.url("/video.mp4"))
    assert waited.value.code == "answer_timeout"
    [file] = sdk.files.list().data
    assert sdk.files.content(file.id).read() == VIDEO
    with pytest.raises(openai.BadRequestError) as forbidden:
        chat(refused.url("/video.mp4"))
    assert forbidden.value.code == "url_forbidden" and refused.connections == 0
    with pytest.raises(openai.APIStatusError) as not_video:
        chat(allowed.url("/text"))
    assert not_video.value.status_code == 415 and not_video.value.code == "unsupported_media"


def test_check_url_resolves_names_through_the_resolver(no_connections):
    target = asyncio.run(check_url("http://localhost:8/x", parse_networks("127.0.0.0/8, ::1/128")))
    assert target.address.is_loopback and target.host == "localhost" and target.host_header == "localhost:8"
    assert target.pinned_url == f"http://{'[::1]' if target.address.version == 6 else '127.0.0.1'}:8/x"


def test_a_download_cut_short_by_the_apis_shutdown_fails_its_video(make_client, records):
    with LoopbackServer(lambda handler: routes(handler, trickle_s=0.2)) as slow:
        client = make_client(api_keys=f"{ALICE_KEY}:alice", url_allowed_networks=ALLOWED)
        video = client.post("/videos", json={"url": slow.url("/trickle")}, headers=ALICE).json()
        time.sleep(0.3)
        client.__exit__(None, None, None)  # the lifespan's end: what SIGTERM does to the API
    failed = records.get_video(video["id"])
    assert (failed["status"], failed["error_code"]) == ("failed", "url_interrupted")
