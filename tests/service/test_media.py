"""GET /videos/{id}/content (HTTP Range) and /frames/{index}, by Bearer key or signed media token."""

import hashlib

import pytest

from service.contract import Settings
from service.media import MediaTokens
from tests.service.conftest import ALICE, BOB
from tests.service.helpers import fake_mp4


def upload(client, content: bytes, headers=None) -> dict:
    response = client.post("/videos", files={"file": ("clip.mp4", content, "video/mp4")}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.fixture
def content() -> bytes:
    return fake_mp4(3, size=100_000) + bytes(range(256)) * 100  # distinct bytes, so slices are checkable


def test_content_is_the_upload_with_its_type_and_seekable_ranges(client, content):
    video = upload(client, content)
    whole = client.get(f"/videos/{video['id']}/content")
    assert whole.status_code == 200 and whole.content == content
    assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"

    seek = client.get(f"/videos/{video['id']}/content", headers={"Range": "bytes=100000-100099"})
    assert seek.status_code == 206
    assert seek.content == content[100_000:100_100]
    assert seek.headers["content-range"] == f"bytes 100000-100099/{len(content)}"
    tail = client.get(f"/videos/{video['id']}/content", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == content[-10:]
    open_ended = client.get(f"/videos/{video['id']}/content", headers={"Range": f"bytes={len(content) - 5}-"})
    assert open_ended.status_code == 206 and open_ended.content == content[-5:]


def test_an_unsatisfiable_range_is_416(client, content):
    video = upload(client, content)
    response = client.get(f"/videos/{video['id']}/content", headers={"Range": f"bytes={len(content) + 10}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(content)}"


def test_another_tenants_content_and_frames_are_404_and_no_key_is_401(tenants_client, content):
    video = upload(tenants_client, content, headers=ALICE)
    assert tenants_client.get(f"/videos/{video['id']}/content", headers=ALICE).status_code == 200
    for path in (f"/videos/{video['id']}/content", f"/videos/{video['id']}/frames/0"):
        assert tenants_client.get(path, headers=BOB).status_code == 404
        assert tenants_client.get(path).status_code == 401
    assert tenants_client.post(f"/videos/{video['id']}/media-token", headers=BOB).status_code == 404


def test_a_media_token_grants_one_video_without_a_header_until_it_expires(tenants_client, content):
    video = upload(tenants_client, content, headers=ALICE)
    other = upload(tenants_client, fake_mp4(4), headers=ALICE)
    grant = tenants_client.post(f"/videos/{video['id']}/media-token", headers=ALICE).json()
    assert grant["content_url"] == f"/videos/{video['id']}/content?token={grant['token']}"
    response = tenants_client.get(grant["content_url"], headers={"Range": "bytes=0-99"})
    assert response.status_code == 206 and response.content == content[:100]
    # The token names its video: it opens no other one, and a forged or expired one opens nothing.
    assert tenants_client.get(f"/videos/{other['id']}/content?token={grant['token']}").status_code == 401
    forged = grant["token"][:-2] + ("AA" if not grant["token"].endswith("AA") else "BB")
    assert tenants_client.get(f"/videos/{video['id']}/content?token={forged}").status_code == 401
    settings = tenants_client.app.state.settings
    expired, _ = MediaTokens(settings).mint(video["id"], now=0)
    response = tenants_client.get(f"/videos/{video['id']}/content?token={expired}")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_token"


def test_tokens_are_accepted_by_every_replica_with_the_same_keys():
    a = MediaTokens(Settings(api_keys="k" * 16))
    b = MediaTokens(Settings(api_keys="k" * 16))
    c = MediaTokens(Settings(api_keys="z" * 16))
    token, expires = a.mint("vid_1")
    assert b.valid(token, "vid_1") and not c.valid(token, "vid_1") and not b.valid(token, "vid_2")
    assert not a.valid(token, "vid_1", now=expires + 1) and not a.valid("nonsense", "vid_1")


def test_frames_are_served_from_the_artifacts_thumbnails_with_caching_headers(client, records, settings):
    video = upload(client, fake_mp4(5))
    assert client.get(f"/videos/{video['id']}/frames/0").status_code == 404  # not indexed yet
    key = "v1/" + "a" * 64 + "/rev/settings"
    frames = settings.frames_dir(key)
    frames.mkdir(parents=True)
    jpeg = b"\xff\xd8\xff\xe0" + hashlib.sha256(b"x").digest() + b"\xff\xd9"
    (frames / "3.jpg").write_bytes(jpeg)
    records.update_video(video["id"], artifact_key=key)
    response = client.get(f"/videos/{video['id']}/frames/3")
    assert response.status_code == 200 and response.content == jpeg
    assert response.headers["content-type"] == "image/jpeg"
    assert "immutable" in response.headers["cache-control"] and response.headers["etag"]
    assert client.get(f"/videos/{video['id']}/frames/4").status_code == 404
    assert client.get(f"/videos/{video['id']}/frames/-1").status_code == 422

    assert client.delete(f"/videos/{video['id']}").status_code == 204
    assert not frames.exists()  # deleted with the last video using the artifact


def test_a_job_s_top_moments_carry_their_frames_and_thumbnails(client, records):
    video = upload(client, fake_mp4(6))
    job = client.post("/ask", json={"video_id": video["id"], "question": "where?"}).json()
    records.update_job(
        job["id"], timeline=[[0.0, 0.1], [0.5, 0.6], [1.0, 0.3]], top_moments=[[0.5, 0.6], [1.0, 0.3]]
    )
    moments = client.get(f"/jobs/{job['id']}").json()["evidence"]["moments"]
    assert moments == [
        {"seconds": 0.5, "share": 0.6, "frame": 1, "thumbnail": f"/videos/{video['id']}/frames/1"},
        {"seconds": 1.0, "share": 0.3, "frame": 2, "thumbnail": f"/videos/{video['id']}/frames/2"},
    ]


def test_the_page_is_served_at_the_root_with_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    texts = [page.text]
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        response = client.get(f"/{asset}")
        assert response.status_code == 200
        texts.append(response.text)
    assert not [text for text in texts if "http://" in text or "https://" in text]  # works offline
