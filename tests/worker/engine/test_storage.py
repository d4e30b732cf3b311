import hashlib

import pytest
import torch

from tests.worker.engine.test_artifact import assert_same, data_start, make_artifact
from worker.engine.artifact import ArtifactError
from worker.engine.storage import ArtifactKey, ArtifactStore, DiskStore, file_sha256, settings_hash

VIDEO = hashlib.sha256(b"video").hexdigest()
KEY = ArtifactKey(VIDEO, "local-0123456789abcdef", settings_hash({"fps": 2.0}))
OTHER = ArtifactKey(VIDEO, "0" * 40, settings_hash({"fps": 1.0}))


@pytest.fixture
def store(tmp_path) -> DiskStore:
    return DiskStore(tmp_path / "artifacts")


# ArtifactKey


def test_key_string_round_trip():
    assert KEY.to_string() == f"v1/{VIDEO}/local-0123456789abcdef/{KEY.settings_hash}"
    assert ArtifactKey.from_string(KEY.to_string()) == KEY
    assert ArtifactKey.from_string(OTHER.to_string()) == OTHER


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        f"v2/{VIDEO}/rev/abcdef01",  # another key layout
        f"v1/{VIDEO}/rev",
        f"v1/{VIDEO}/rev/abcdef01/extra",
        f"v1/{VIDEO}/../abcdef01",  # path traversal
        f"v1/{VIDEO}/.hidden/abcdef01",
        f"v1/{VIDEO}/has space/abcdef01",
        f"v1/{VIDEO}/rev/ABCDEF01",  # hashes are lowercase hex
        f"v1/{VIDEO}/rev/abc",  # too short to be a hash
        f"v1/{VIDEO[:-1]}z/rev/abcdef01",
        "v1//rev/abcdef01",
    ],
)
def test_malformed_key_strings_are_rejected(text):
    with pytest.raises(ValueError, match="malformed"):
        ArtifactKey.from_string(text)


def test_malformed_key_fields_are_rejected():
    with pytest.raises(ValueError, match="model_revision"):
        ArtifactKey(VIDEO, "a/b", "abcdef01")
    with pytest.raises(ValueError, match="video_hash"):
        ArtifactKey("/etc/passwd", "rev", "abcdef01")
    with pytest.raises(ValueError, match="malformed"):
        ArtifactKey.from_string(None)


# DiskStore


def test_put_get_contains_delete_keys(store):
    artifact = make_artifact(dtype=torch.bfloat16)
    assert not store.contains(KEY)
    assert store.get(KEY) is None
    assert store.nbytes(KEY) is None
    assert list(store.keys()) == []

    written = store.put(KEY, artifact)

    assert store.contains(KEY) and not store.contains(OTHER)
    assert written == store.nbytes(KEY) == store.path_for(KEY).stat().st_size
    assert_same(artifact, store.get(KEY))
    assert store.get(OTHER) is None

    store.put(OTHER, make_artifact(seed=1))
    assert sorted(store.keys(), key=ArtifactKey.to_string) == sorted([KEY, OTHER], key=ArtifactKey.to_string)

    assert store.delete(KEY) is True
    assert store.delete(KEY) is False
    assert not store.contains(KEY) and store.get(KEY) is None
    assert list(store.keys()) == [OTHER]


def test_put_replaces(store):
    store.put(KEY, make_artifact(seed=0))
    replacement = make_artifact(lengths=(3, 3), seed=1)

    store.put(KEY, replacement)

    assert_same(replacement, store.get(KEY))
    assert list(store.keys()) == [KEY]


def test_layout_on_disk(store):
    store.put(KEY, make_artifact())

    assert (
        store.path_for(KEY)
        == store.root / "v1" / VIDEO / KEY.model_revision / f"{KEY.settings_hash}.safetensors"
    )
    assert store.path_for(KEY).is_file()


def test_keys_skip_temporary_and_foreign_files(store):
    store.put(KEY, make_artifact())
    folder = store.path_for(KEY).parent
    (folder / f".{KEY.settings_hash}.safetensors.x1y2.tmp").write_bytes(b"partial")
    (folder / "NOT-HEX.safetensors").write_bytes(b"stray")
    (store.root / "README").write_text("hello")

    assert list(store.keys()) == [KEY]


def test_corrupted_blob_raises(store):
    store.put(KEY, make_artifact())
    path = store.path_for(KEY)
    data = bytearray(path.read_bytes())
    data[data_start(data) + 3] ^= 0xFF
    path.write_bytes(data)

    assert store.contains(KEY)
    with pytest.raises(ArtifactError, match="checksum"):
        store.get(KEY)
    store.put(KEY, make_artifact())  # callers rebuild over it
    assert_same(make_artifact(), store.get(KEY))


def test_store_is_a_context_manager(tmp_path):
    with DiskStore(tmp_path / "s") as store:
        assert isinstance(store, ArtifactStore)
        store.put(KEY, make_artifact())
    assert DiskStore(tmp_path / "s").contains(KEY)  # another process sees the same directory


# Hashes


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 1024 + 17])
def test_file_sha256(tmp_path, size):
    content = bytes(i * 7 % 256 for i in range(size))
    path = tmp_path / "video.mp4"
    path.write_bytes(content)

    assert file_sha256(path) == hashlib.sha256(content).hexdigest()
    assert file_sha256(path, chunk=1024) == hashlib.sha256(content).hexdigest()


def test_settings_hash():
    settings = {"fps": 2.0, "max_frames": 64, "guide": "Describe the video.", "nested": {"a": 1, "b": [1, 2]}}
    reordered = {
        "nested": {"b": [1, 2], "a": 1},
        "guide": "Describe the video.",
        "max_frames": 64,
        "fps": 2.0,
    }

    assert settings_hash(settings) == settings_hash(reordered)
    assert len(settings_hash(settings)) == 16
    assert settings_hash(settings) != settings_hash({**settings, "fps": 1.0})
    assert settings_hash(settings) != settings_hash({**settings, "nested": {"a": 1, "b": [2, 1]}})
    assert settings_hash({"fps": 2.0}) == "2f9df08246ad4f12"  # stable across processes and releases
    ArtifactKey(VIDEO, "rev", settings_hash(settings))  # fits a key
    with pytest.raises(ValueError):
        settings_hash({"fps": float("nan")})
