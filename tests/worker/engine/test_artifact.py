import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worker.engine.artifact
from worker.engine.artifact import (
    ArtifactError,
    CompressedKV,
    artifact_from_bytes,
    artifact_to_bytes,
    load_artifact,
    save_artifact,
)


def make_artifact(
    lengths: tuple[int, ...] = (7, 12, 4), dtype: torch.dtype = torch.float32, seed: int = 0
) -> CompressedKV:
    """A small artifact: 2 kv heads, head_dim 8, two text0 tokens per layer, then tokens of 5 frames."""
    generator = torch.Generator().manual_seed(seed)
    num_frames = 5

    def layer_frames(length: int) -> torch.Tensor:
        video = torch.randint(0, num_frames, (length - 2,), generator=generator).sort().values
        return torch.cat([torch.tensor([-1, -1]), video]).to(torch.int32)

    return CompressedKV(
        keys=[torch.randn(1, 2, n, 8, generator=generator).to(dtype) for n in lengths],
        values=[torch.randn(1, 2, n, 8, generator=generator).to(dtype) for n in lengths],
        token_frames=[layer_frames(n) for n in lengths],
        next_position=117,
        timestamps=[0.25 + 0.5 * i for i in range(num_frames)],
        metadata={"model_id": "tiny", "settings": {"fps": 2.0, "budget": [3, 4]}, "kept": list(lengths)},
    )


def assert_same(a: CompressedKV, b: CompressedKV) -> None:
    assert a.num_layers == b.num_layers
    for part in ("keys", "values", "token_frames"):
        for x, y in zip(getattr(a, part), getattr(b, part), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.next_position, a.timestamps, a.metadata) == (b.next_position, b.timestamps, b.metadata)


def data_start(data: bytes) -> int:
    """Offset of the first tensor byte in a safetensors file."""
    return 8 + int.from_bytes(data[:8], "little")


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "artifact.safetensors"
    save_artifact(make_artifact(), path)
    return path


# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    artifact = make_artifact(dtype=dtype)
    path = tmp_path / "a.safetensors"

    written = save_artifact(artifact, path)
    loaded = load_artifact(path)

    assert written == path.stat().st_size
    assert loaded.lengths == [7, 12, 4]
    assert_same(artifact, loaded)


def test_bfloat16_round_trip_keeps_raw_bits(tmp_path):
    # Values float32 cannot tell apart after rounding, and NaN / inf payloads, must survive bit for bit.
    keys = torch.tensor([1.0, 1.0078125, -0.0, float("inf"), float("nan"), 3.0e38, 1e-40, 7.0])
    artifact = make_artifact(lengths=(2,), dtype=torch.bfloat16)
    artifact.keys[0] = keys.to(torch.bfloat16).reshape(1, 1, 2, 4).expand(1, 2, 2, 4).contiguous()
    artifact.values[0] = artifact.keys[0].clone()

    loaded = artifact_from_bytes(artifact_to_bytes(artifact))

    assert torch.equal(loaded.keys[0].view(torch.int16), artifact.keys[0].view(torch.int16))


def test_bytes_round_trip_matches_the_file(tmp_path):
    artifact = make_artifact(dtype=torch.bfloat16)
    path = tmp_path / "a.safetensors"
    save_artifact(artifact, path)

    data = artifact_to_bytes(artifact)

    assert data == path.read_bytes()
    assert_same(artifact, artifact_from_bytes(data))


def test_saving_is_deterministic(tmp_path):
    # safetensors writes its metadata map in hash order, which changes from call to call.
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_artifact(make_artifact(), first)
    save_artifact(make_artifact(), second)

    blobs = {artifact_to_bytes(make_artifact()) for _ in range(10)}

    assert blobs == {first.read_bytes()} == {second.read_bytes()}


def test_views_and_shared_tensors_are_saved(tmp_path):
    artifact = make_artifact(lengths=(6, 6))
    artifact.keys = [k.transpose(2, 3).transpose(2, 3)[:, :, :4] for k in artifact.keys]  # not contiguous
    artifact.values = [v[:, :, :4] for v in artifact.values]
    artifact.token_frames = [artifact.token_frames[0][:4]] * 2  # one tensor for both layers

    loaded = artifact_from_bytes(artifact_to_bytes(artifact))

    assert_same(artifact, loaded)


def test_empty_timestamps_and_text_only_layers():
    artifact = make_artifact(lengths=(2, 2))
    artifact.timestamps = []

    assert_same(artifact, artifact_from_bytes(artifact_to_bytes(artifact)))


def test_helpers():
    artifact = make_artifact(dtype=torch.bfloat16)

    assert artifact.num_layers == 3
    assert artifact.lengths == [7, 12, 4]
    assert artifact.nbytes == 2 * (7 + 12 + 4) * 2 * 8 * 2  # keys and values, heads, head_dim, bf16
    moved = artifact.to("cpu", torch.float32)
    assert moved.keys[0].dtype == torch.float32 and moved.token_frames[0].dtype == torch.int32
    moved.metadata["kept"].append(99)
    assert artifact.metadata["kept"] == [7, 12, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_onto_gpu(saved):
    loaded = load_artifact(saved, device="cuda")

    assert all(k.is_cuda for k in loaded.keys) and all(f.is_cuda for f in loaded.token_frames)
    assert_same(make_artifact(), loaded.to("cpu"))


# Damaged files


def test_flipped_tensor_byte_is_a_checksum_error(saved):
    data = bytearray(saved.read_bytes())
    data[data_start(data) + 100] ^= 0x01
    saved.write_bytes(data)

    with pytest.raises(ArtifactError, match="checksum") as error:
        load_artifact(saved)
    assert str(saved) in str(error.value)
    assert error.value.code == "artifact_corrupt"


def test_changed_header_value_is_a_checksum_error(saved):
    data = saved.read_bytes()
    saved.write_bytes(data.replace(b'"next_position":"117"', b'"next_position":"118"'))

    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(saved)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: keep if keep >= 0 else len(data) - 1])

    with pytest.raises(ArtifactError, match=str(saved)):
        load_artifact(saved)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not an artifact at all",
        random.Random(0).randbytes(4096),
        (10).to_bytes(8, "little") + b"[1,2,3]   ",
    ],
    ids=["empty", "text", "random", "json-array-header"],
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)

    with pytest.raises(ArtifactError):
        load_artifact(path)
    with pytest.raises(ArtifactError):
        artifact_from_bytes(content)


def test_other_safetensors_file_is_not_an_artifact(tmp_path):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, path)

    with pytest.raises(ArtifactError, match="not a compressed-KV artifact"):
        load_artifact(path)


def test_every_single_bit_flip_is_refused():
    data = artifact_to_bytes(make_artifact(lengths=(3, 2)))
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        with pytest.raises(ArtifactError):
            artifact_from_bytes(bytes(damaged))


def test_other_format_version(saved, monkeypatch):
    monkeypatch.setattr(worker.engine.artifact, "ARTIFACT_FORMAT", 2)
    save_artifact(make_artifact(), saved)
    monkeypatch.undo()

    with pytest.raises(ArtifactError, match="format '2'"):
        load_artifact(saved)


def test_missing_file_is_not_an_artifact_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "missing.safetensors")


# Inconsistent artifacts are refused on save


def _drop_last_value_token(a):
    a.values[1] = a.values[1][:, :, :-1]


def _add_layer_of_keys(a):
    a.keys.append(a.keys[0])


def _other_head_dim(a):
    a.keys[2] = a.values[2] = torch.zeros(1, 2, 4, 16)


def _frames_too_short(a):
    a.token_frames[0] = a.token_frames[0][:-1]


def _frames_int64(a):
    a.token_frames[0] = a.token_frames[0].long()


def _frame_past_the_end(a):
    a.token_frames[0][-1] = len(a.timestamps)


def _negative_position(a):
    a.next_position = -1


def _metadata_not_json(a):
    a.metadata["when"] = object()


def _values_other_dtype(a):
    a.values[0] = a.values[0].double()


def _no_layers(a):
    a.keys, a.values, a.token_frames = [], [], []


@pytest.mark.parametrize(
    "break_it",
    [
        _drop_last_value_token,
        _add_layer_of_keys,
        _other_head_dim,
        _frames_too_short,
        _frames_int64,
        _frame_past_the_end,
        _negative_position,
        _metadata_not_json,
        _values_other_dtype,
        _no_layers,
    ],
)
def test_inconsistent_artifact_is_refused(tmp_path, break_it):
    artifact = make_artifact()
    break_it(artifact)
    path = tmp_path / "a.safetensors"

    with pytest.raises(ValueError):
        save_artifact(artifact, path)
    assert list(tmp_path.iterdir()) == []


# Atomic writes


@pytest.mark.parametrize("failing", ["replace", "fsync", "encode"])
def test_failed_write_keeps_the_previous_file(saved, monkeypatch, failing):
    before = saved.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk on fire")

    if failing == "encode":
        monkeypatch.setattr(worker.engine.artifact.safetensors.torch, "save", fail)
    else:
        monkeypatch.setattr(worker.engine.artifact.os, failing, fail)
    with pytest.raises(OSError, match="disk on fire"):
        save_artifact(make_artifact(seed=1), saved)
    monkeypatch.undo()

    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary file left
    assert_same(make_artifact(), load_artifact(saved))


def test_interrupted_write_keeps_the_previous_file(saved, monkeypatch):
    # KeyboardInterrupt (or a worker's soft time limit) between write and rename cleans up too.
    before = saved.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker.engine.artifact.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(make_artifact(seed=1), saved)

    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_overwrite_replaces_the_file(saved):
    replacement = make_artifact(lengths=(3,), dtype=torch.bfloat16, seed=2)

    save_artifact(replacement, saved)

    assert_same(replacement, load_artifact(saved))
    assert oct(saved.stat().st_mode & 0o777) == oct(0o644)


# Dependencies


def test_engine_storage_modules_do_not_import_transformers():
    script = (
        "import sys, worker.engine.artifact, worker.engine.storage; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert not any(m.split('.')[0] in sys.modules for m in ('celery', 'fastapi', 'redis'))"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[3])
