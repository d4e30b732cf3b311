"""Thumbnails written while indexing, and conversations answered by the task: against a private Redis, a
tiny model and a real clip (the task adapters are called in process, as in test_tasks.py)."""

import hashlib
import io

import av
import numpy as np

import worker.serving.tasks
from service.conversations import Conversations
from tests.helpers import make_video, synthetic_frame
from tests.worker.serving.test_tasks import BUNNY, TENANT, upload
from worker.serving.tasks import answer_job, index_video_job
from worker.serving.thumbnails import ThumbnailWriter, encode_jpeg


def decode_jpeg(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="image2pipe") as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_a_jpeg_is_at_most_160_wide_keeps_its_aspect_and_its_picture():
    image = decode_jpeg(encode_jpeg(synthetic_frame(5, 448, 252)))
    assert image.shape == (90, 160, 3)
    assert abs(float(np.median(image[30:60, 60:100])) - float(synthetic_frame(5, 8, 8)[4, 4, 0])) <= 3
    assert image[:5, :5].min() > 200  # the white marker stays top-left
    small = decode_jpeg(encode_jpeg(synthetic_frame(0, 112, 56)))
    assert small.shape == (56, 112, 3)  # never upscaled


def test_indexing_writes_a_thumbnail_per_sampled_frame_and_a_follow_up_gets_the_conversation(rt, settings):
    video = upload(rt, BUNNY)
    index_video_job(rt, video["id"])
    ready = rt.records.get_video(video["id"])
    frames = settings.frames_dir(ready["artifact_key"])
    names = sorted(path.name for path in frames.iterdir())
    assert names == sorted(f"{index}.jpg" for index in range(ready["frames"]))
    assert decode_jpeg((frames / "0.jpg").read_bytes()).shape[1] == 112  # the tiny preset's frames
    assert not [p for p in frames.parent.iterdir() if ".tmp-" in p.name]

    # Two questions in one conversation: the second is answered with the first exchange in its prompt,
    # from the same cached artifact, which stays byte-identical.
    artifact = settings.artifacts_dir / f"{ready['artifact_key']}.safetensors"
    original = hashlib.sha256(artifact.read_bytes()).hexdigest()
    conversations = Conversations(rt.records)
    conversation = conversations.create(tenant=TENANT, video_id=video["id"])
    job_ids = []
    for question in ("Who is there?", "And what did he do after that?"):
        job = rt.records.create_job(
            tenant=TENANT, video_id=video["id"], kind="answer", question=question, mode="cached",
            max_new_tokens=4, conversation_id=conversation["id"],
        )  # fmt: skip
        conversations.add_job(conversation["id"], job["id"])
        answer_job(rt, job["id"])
        job_ids.append(job["id"])
    first, second = (rt.records.get_job(job_id) for job_id in job_ids)
    assert first["status"] == second["status"] == "succeeded"
    assert (first["history_turns"], second["history_turns"]) == (0, 1)
    assert second["cache_hit"] is True
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == original


def test_a_failed_compression_leaves_no_thumbnails_behind(rt, settings, tmp_path, monkeypatch):
    writers = []

    class FailingAfterThree(ThumbnailWriter):  # the compression fails once three frames were staged
        def __init__(self, target):
            super().__init__(target)
            writers.append(self)

        def __call__(self, frame):
            super().__call__(frame)
            if self.count == 3:
                raise RuntimeError("the volume is full")

    monkeypatch.setattr(worker.serving.tasks, "ThumbnailWriter", FailingAfterThree)
    clip = tmp_path / "clip.mp4"
    make_video(clip, seconds=6)
    bad = upload(rt, clip)
    index_video_job(rt, bad["id"])
    assert rt.records.get_video(bad["id"])["status"] == "failed"
    [writer] = writers
    assert writer.count == 3  # frames were decoded and staged before the failure...
    assert not writer.staging.exists() and not writer.target.exists()  # ...and none is left
