"""A full data volume (a real tmpfs, a real ENOSPC): 507 storage_full at upload, nothing half-written, and
the next upload works once there is space again."""

import pytest

from tests.conftest import fill
from tests.service.helpers import fake_mp4


def test_a_full_volume_is_a_507_that_leaves_nothing_and_passes(make_client, settings, small_volume):
    data = small_volume(4 * 1024 * 1024)
    client = make_client(data_dir=data)
    assert client.post("/videos", files={"file": ("a.mp4", fake_mp4(seed=1), "video/mp4")}).status_code == 202
    filler = fill(data, leave=64 * 1024)

    response = client.post(
        "/videos", files={"file": ("b.mp4", fake_mp4(seed=2, size=512 * 1024), "video/mp4")}
    )
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "storage_full" and int(response.headers["retry-after"]) > 0
    assert not list((data / "uploads" / ".incoming").iterdir())  # the partial file is gone
    assert client.get("/videos").json()["total"] == 1  # and no record of it

    filler.unlink()  # space is back
    again = client.post("/videos", files={"file": ("b.mp4", fake_mp4(seed=2, size=512 * 1024), "video/mp4")})
    assert again.status_code == 202, again.text
    assert client.get("/videos").json()["total"] == 2


def test_the_volume_fixture_really_fills(small_volume):
    data = small_volume(1024 * 1024)
    fill(data, leave=0)
    with pytest.raises(OSError, match="No space left"):
        (data / "more").write_bytes(b"\0" * 65536)
