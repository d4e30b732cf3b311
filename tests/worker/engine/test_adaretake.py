"""The allocation and scoring arithmetic of AdaReTaKe, on plain tensors (ADARETAKE.md section 7, item 3-4)."""

import pytest
import torch

from worker.engine.adaretake import (
    BudgetLedger,
    CompressionConfig,
    bottom_right_causal_mask,
    chunk_keep_counts,
    fill_to_caps,
    frame_distances,
    global_ratio,
    keep_counts,
    layer_ratios,
    paper_chunk_ratios,
    prompt_to_video_scores,
    reference_keep_counts,
    select_tokens,
)

RATIOS = [0.01, 0.108, 0.3, 0.5, 0.9, 1.0]


def test_global_ratio():
    assert global_ratio(100, 100) == 1.0
    assert global_ratio(50, 100) == 1.0
    assert global_ratio(147_456, 16_000) == pytest.approx(0.1085, abs=1e-4)


@pytest.mark.parametrize("mode", ["adakv", "even", "pyramid"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_layer_ratios_average_exactly_r(mode, ratio):
    scores = torch.rand(28, 2304, generator=torch.Generator().manual_seed(0)) ** 4
    ratios = layer_ratios(scores, ratio, mode)
    assert ratios.shape == (28,)
    assert float(ratios.sum()) == pytest.approx(28 * ratio, rel=1e-12)
    assert float(ratios.max()) <= 1 + 1e-12 and float(ratios.min()) > 0


def test_adakv_follows_the_formula_when_no_layer_is_capped():
    scores = torch.rand(4, 100, generator=torch.Generator().manual_seed(1))
    scores[2] *= 3  # layer 2 holds most of the top scores
    ratio, layers, tokens = 0.2, 4, 100
    budget = int(max(1, ratio * tokens) * layers)
    counts = torch.bincount(scores.flatten().topk(budget).indices // tokens, minlength=layers).double()
    expected = layers * ratio * (1 + counts) / (layers + budget)
    assert torch.allclose(layer_ratios(scores, ratio, "adakv"), expected)
    assert int(layer_ratios(scores, ratio, "adakv").argmax()) == 2


def test_pyramid_decreases_with_depth():
    ratios = layer_ratios(torch.rand(6, 50), 0.2, "pyramid")
    assert all(a > b for a, b in zip(ratios[:-1], ratios[1:], strict=False))


@pytest.mark.parametrize("ratio", RATIOS)
def test_keep_counts_within_bounds(ratio):
    counts = keep_counts(layer_ratios(torch.rand(8, 37), ratio, "adakv"), 37)
    assert all(1 <= c <= 37 for c in counts)
    assert sum(counts) <= 8 * max(1, ratio * 37) + 1e-9


def test_reference_variant_may_exceed_but_stays_in_bounds():
    flat = torch.full((4, 200), 0.5)  # every token a heavy hitter: h = 1, factor = min(2, sqrt(4)) = 2
    assert reference_keep_counts(flat, layer_ratios(flat, 0.25, "even"), 200, alpha=4.0) == [100] * 4
    peaked = torch.zeros(4, 200)
    peaked[:, 0] = 1.0  # one heavy hitter: h = 1/200, factor clamps to 0.5
    assert reference_keep_counts(peaked, layer_ratios(peaked, 0.25, "even"), 200, alpha=4.0) == [25] * 4
    counts = reference_keep_counts(torch.rand(4, 200), torch.full((4,), 0.9), 200, alpha=4.0)
    assert all(1 <= c <= 200 for c in counts)


def test_chunk_keep_counts_dispatches_on_temporal_variant():
    flat = torch.full((4, 100), 0.5)
    paper = chunk_keep_counts(flat, 0.25, CompressionConfig(layer_allocation="even"))
    reference = chunk_keep_counts(
        flat, 0.25, CompressionConfig(layer_allocation="even", temporal_allocation="reference")
    )
    assert paper == [25] * 4
    assert reference == [50] * 4


def test_select_tokens_sorted_top_k():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    index = select_tokens(scores, 3)
    assert index.tolist() == [1, 3, 5]
    assert bool((index[1:] > index[:-1]).all())


def test_fill_to_caps_redistributes_and_conserves():
    shares = fill_to_caps(torch.tensor([10.0, 1.0, 1.0]), 12.0, torch.tensor([4.0, 10.0, 10.0]))
    assert shares.tolist() == pytest.approx([4.0, 4.0, 4.0])
    assert float(fill_to_caps(torch.zeros(3), 6.0, torch.full((3,), 5.0)).sum()) == pytest.approx(6.0)
    assert float(fill_to_caps(torch.ones(2), 100.0, torch.tensor([3.0, 4.0])).sum()) == pytest.approx(7.0)


@pytest.mark.parametrize("budget", [10, 500, 3000, 10_000])
def test_paper_chunk_ratios_never_exceed_budget(budget):
    distances = torch.rand(9, generator=torch.Generator().manual_seed(budget))
    distances[3] = 0.0
    tokens = [288] * 8 + [144]
    ratios = paper_chunk_ratios(distances, tokens, budget)
    kept = sum(r * k for r, k in zip(ratios, tokens, strict=True))
    assert kept <= budget + 1e-6
    assert kept == pytest.approx(min(budget, sum(tokens)))
    assert all(0 <= r <= 1 + 1e-12 for r in ratios)


def test_frame_distances():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert frame_distances(features).tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_prompt_scores_equal_naive_attention():
    """GQA-aware scores over the P x K block equal a softmax over full repeated-KV attention rows."""
    torch.manual_seed(0)
    heads, kv_heads, past, num_video, num_prompt, dim = 4, 2, 5, 7, 3, 8
    query = torch.randn(1, heads, num_video + num_prompt, dim)
    key = torch.randn(1, kv_heads, past + num_video + num_prompt, dim)
    scores = prompt_to_video_scores(query, key, num_video, num_prompt, dim**-0.5)

    key_full = key.repeat_interleave(heads // kv_heads, dim=1)  # [1, heads, kv, dim]
    video_keys = key_full[:, :, past : past + num_video]
    naive = (query[:, :, -num_prompt:] @ video_keys.transpose(-1, -2) * dim**-0.5).softmax(-1)
    expected = naive.sum(dim=2).mean(dim=1)[0]
    assert torch.allclose(scores, expected, atol=1e-6)


def test_bottom_right_mask():
    mask = bottom_right_causal_mask(2, 5, torch.device("cpu"))[0, 0]
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize(
    "field,value",
    [
        ("layer_allocation", "nope"),
        ("temporal_allocation", "x"),
        ("chunk_frames", 3),
        ("budget", 0),
        ("guide_prompt", " "),
    ],
)
def test_config_rejects_nonsense(field, value):
    with pytest.raises(ValueError):
        CompressionConfig(**{field: value})


@pytest.mark.parametrize("mode", ["adakv", "even", "pyramid"])
@pytest.mark.parametrize("video_budget", [9, 20, 100, 1000])
def test_budget_ledger_holds_the_video_to_its_budget(mode, video_budget):
    """Down to one token per chunk and layer, whatever the chunks' shares and the layers' skew."""
    generator = torch.Generator().manual_seed(video_budget)
    chunk_tokens, layers = [48] * 8 + [24], 4
    distances = torch.rand(9, generator=generator) ** 3
    ledger = BudgetLedger(paper_chunk_ratios(distances, chunk_tokens, video_budget), chunk_tokens, layers)
    for index, tokens in enumerate(chunk_tokens):
        scores = torch.rand(layers, tokens, generator=generator) ** 8
        keep = keep_counts(layer_ratios(scores, ledger.ratio(index), mode), tokens)
        assert all(1 <= k <= tokens for k in keep)
        ledger.spend(keep)
    assert ledger.kept <= layers * video_budget
    assert ledger.kept >= min(layers * video_budget, layers * sum(chunk_tokens)) - layers
