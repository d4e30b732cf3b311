"""AdaReTaKe: compressed chunked prefill of a video into a per-layer KV cache.

Reads top to bottom like the method (ADARETAKE.md): settings; the global ratio; prompt-to-video scores;
layer allocation (adakv, even, pyramid); temporal allocation (paper, reference, none); top-k selection;
the attention function that scores and masks per layer; the chunk loop that ties them together.

Nothing here lives on the model object: every compression carries its own `ChunkScratch`, passed to the
attention function through the forward's kwargs, so two compressions in one process never interfere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine.config import SamplingConfig
from worker.engine.evidence import EvidenceScratch

LAYER_ALLOCATIONS = ("adakv", "even", "pyramid")
TEMPORAL_ALLOCATIONS = ("paper", "reference", "none")
DEFAULT_GUIDE_PROMPT = "Watch the video carefully and describe every event, object, person and action in it."


@dataclass(frozen=True)
class CompressionConfig:
    """Every setting that changes a compressed cache.

    Args:
        sampling (SamplingConfig): fps, frame cap and frame size.
        budget (int): context budget M in tokens (`max_input_length`); text0 counts against it.
        chunk_frames (int): frames per prefill chunk (even: two frames make one temporal grid).
        layer_allocation (str): "adakv" (paper Eq. 10-16), "even" or "pyramid".
        temporal_allocation (str): "paper" (budget split by frame distance, never over budget),
            "reference" (the released code's heavy-hitter factor, may exceed it) or "none".
        guide_prompt (str): question-agnostic text whose attention to each chunk scores the video tokens.
        heavy_hitter_alpha (float): alpha of the "reference" temporal factor.
    """

    sampling: SamplingConfig = SamplingConfig()
    budget: int = 16_000
    chunk_frames: int = 32
    layer_allocation: str = "adakv"
    temporal_allocation: str = "paper"
    guide_prompt: str = DEFAULT_GUIDE_PROMPT
    heavy_hitter_alpha: float = 4.0

    def __post_init__(self):
        if self.layer_allocation not in LAYER_ALLOCATIONS:
            raise ValueError(
                f"layer_allocation must be one of {LAYER_ALLOCATIONS}, got {self.layer_allocation!r}"
            )
        if self.temporal_allocation not in TEMPORAL_ALLOCATIONS:
            raise ValueError(
                f"temporal_allocation must be one of {TEMPORAL_ALLOCATIONS}, got {self.temporal_allocation!r}"
            )
        if self.chunk_frames < 2 or self.chunk_frames % 2:
            raise ValueError(f"chunk_frames must be a positive even number, got {self.chunk_frames}")
        if self.budget < 1:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if not self.guide_prompt.strip():
            raise ValueError("guide_prompt must not be empty")

    def settings(self) -> dict:
        """JSON-ready settings, for the cache key and the artifact's metadata."""
        return asdict(self)


PRESETS = {
    # The paper's 7B setting: 2 fps, up to 2048 frames at long side 448, 16K budget, 32-frame chunks.
    "paper-7b": CompressionConfig(),
    # Seconds on a CPU with the tiny test checkpoints: small frames, a budget that still compresses.
    "tiny": CompressionConfig(sampling=SamplingConfig(long_side=112), budget=64, chunk_frames=4),
}


# ---- 1. global ratio --------------------------------------------------------------------------------


def global_ratio(num_tokens: int, budget: int) -> float:
    """r = 1 when the input fits the budget, else M / N."""
    return 1.0 if num_tokens <= budget else budget / num_tokens


# ---- 2. scores: how much the guide prompt attends to each video token of the chunk ------------------


def prompt_to_video_scores(
    query_states: torch.Tensor, key_states: torch.Tensor, num_video: int, num_prompt: int, scaling: float
) -> torch.Tensor:
    """Per-token importance of the chunk's video tokens for one layer.

    Softmax of the guide prompt's (post-RoPE) queries over the chunk's video keys only, in fp32, summed
    over prompt tokens and averaged over all query heads. Only the P x K block is computed.

    Args:
        query_states (torch.Tensor): `[1, heads, q_len, head_dim]`: the chunk's video, then prompt queries.
        key_states (torch.Tensor): `[1, kv_heads, kv_len, head_dim]`: past cache, the chunk, the prompt.

    Returns:
        torch.Tensor: `[num_video]` float32.
    """
    _, heads, _, head_dim = query_states.shape
    kv_heads = key_states.shape[1]
    queries = query_states[0, :, -num_prompt:].float().view(kv_heads, heads // kv_heads, num_prompt, head_dim)
    keys = key_states[0, :, -(num_video + num_prompt) : -num_prompt].float()  # [kv_heads, K, head_dim]
    logits = torch.einsum("hgpd,hkd->hgpk", queries, keys) * scaling  # [kv_heads, G, P, K]
    return logits.softmax(dim=-1).sum(dim=2).mean(dim=(0, 1))  # [K]


# ---- 3. layer allocation ----------------------------------------------------------------------------


def fill_to_caps(weights: torch.Tensor, total: float, caps: torch.Tensor) -> torch.Tensor:
    """Split `total` in proportion to `weights`, never giving an entry more than its cap: whatever a capped
    entry cannot take goes to the others, in proportion again (water filling). The sum is exactly
    min(total, caps.sum())."""
    weights, caps = weights.double(), caps.double()
    shares = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    remaining = min(float(total), float(caps.sum()))
    while remaining > 1e-12 and free.any():
        w = torch.where(free, weights, 0.0)
        w = w if w.sum() > 0 else free.double()  # all-zero weights: split evenly
        offer = remaining * w / w.sum()
        over = free & (shares + offer >= caps)
        if not over.any():
            shares += offer
            break
        remaining -= float((caps - shares)[over].sum())
        shares[over] = caps[over]
        free &= ~over
    return shares


def layer_ratios(scores: torch.Tensor, ratio: float, mode: str) -> torch.Tensor:
    """Per-layer keep ratios that average exactly `ratio` (each at most 1).

    Args:
        scores (torch.Tensor): `[layers, K]` prompt-to-video scores of one chunk.
        ratio (float): the chunk's ratio r.
        mode (str): "adakv": r_l = L r (1 + c_l) / (L + B), c_l = layer l's share of the top
            B = int(max(1, rK) L) scores of all layers (paper Eq. 10-16; the +1 is Eq. 16's smoothing);
            "even": r_l = r;
            "pyramid": linearly decreasing with depth, PyramidDrop-like.
    """
    num_layers, num_video = scores.shape
    if mode == "even":
        weights = torch.ones(num_layers)
    elif mode == "pyramid":
        weights = torch.arange(num_layers, 0, -1, dtype=torch.float64)  # L, L-1, ..., 1
    elif mode == "adakv":
        budget = int(max(1.0, ratio * num_video) * num_layers)
        top = scores.flatten().topk(min(budget, scores.numel())).indices // num_video
        counts = torch.bincount(top, minlength=num_layers).double()  # c_l
        weights = 1 + counts  # proportional to L r (1 + c_l) / (L + B)
    else:
        raise ValueError(f"unknown layer allocation {mode!r}")
    return fill_to_caps(weights, ratio * num_layers, torch.ones(num_layers))


def keep_counts(ratios: torch.Tensor, num_video: int) -> list[int]:
    """Tokens to keep per layer, each between 1 and K, summing to floor(sum_l r_l K) (at least one per
    layer). The 1-token minimum is taken out of that total first and the rest follows the ratios, split by
    largest remainder: flooring each layer alone would waste budget, lifting layers to 1 would exceed it."""
    num_layers = len(ratios)
    exact = ratios.double() * num_video  # [layers]
    total = max(num_layers, int(float(exact.sum()) + 1e-9))
    caps = torch.full((num_layers,), num_video - 1.0, dtype=torch.float64)
    extra = fill_to_caps((exact - 1).clamp_min(0), total - num_layers, caps)
    counts = extra.floor()
    shortfall = round(float(extra.sum() - counts.sum()))
    counts[(extra - counts).argsort(descending=True)[:shortfall]] += 1
    return (counts + 1).long().tolist()


# ---- 4. temporal allocation -------------------------------------------------------------------------


def frame_distances(grid_features: torch.Tensor) -> torch.Tensor:
    """1 - cos between each temporal grid's mean-pooled vision features and the previous grid's.

    Args:
        grid_features (torch.Tensor): `[num_grids, hidden]`.

    Returns:
        torch.Tensor: `[num_grids]` float32; the first grid has no predecessor and gets 0.
    """
    features = grid_features.float()
    cosine = torch.nn.functional.cosine_similarity(features[1:], features[:-1], dim=-1)
    return torch.cat([torch.zeros(1), (1 - cosine).cpu()])


def paper_chunk_ratios(distances: torch.Tensor, chunk_tokens: list[int], video_budget: int) -> list[float]:
    """Paper Eq. 8-9: split the video budget across chunks in proportion to their mean frame distance D_i,
    a chunk never getting more than all its tokens (the excess goes to the others). Budget-conserving.

    Args:
        distances (torch.Tensor): `[num_chunks]` mean adjacent-grid distance of each chunk.
        chunk_tokens (list[int]): video tokens K_i of each chunk.
        video_budget (int): tokens the whole video may keep (per layer, on average).
    """
    tokens = torch.tensor(chunk_tokens, dtype=torch.float64)
    budgets = fill_to_caps(distances.double().clamp_min(0), float(video_budget), tokens)
    return (budgets / tokens).tolist()


def reference_keep_counts(
    scores: torch.Tensor, ratios: torch.Tensor, num_video: int, alpha: float
) -> list[int]:
    """The released code's temporal factor: per layer, h = share of scores above 1% of the layer's max;
    r'_l = min(1, clamp(sqrt(alpha h), 0.5, 2) r_l); keep = max(1, int(max(0.01, r'_l) K)). Not
    budget-conserving: a chunk and layer may take up to twice its share."""
    counts = []
    for layer_scores, ratio in zip(scores, ratios.tolist(), strict=True):
        heavy = (layer_scores > 0.01 * layer_scores.max()).double().mean().item()
        factor = min(2.0, max(0.5, math.sqrt(alpha * heavy)))
        adjusted = min(1.0, factor * ratio)
        counts.append(min(num_video, max(1, int(max(0.01, adjusted) * num_video))))
    return counts


class BudgetLedger:
    """Holds a video to its budget across chunks: the tokens chunk i may keep over all layers are what the
    allocation planned up to and including chunk i minus what was kept so far (rounding left-overs move
    on), never eating into the 1-token-per-layer minimum that every later chunk still needs. The total
    then never exceeds sum_i r_i K_i L, as long as that allows one token per chunk and layer.

    Args:
        chunk_ratios (list[float]): r_i per chunk, from the temporal allocation.
        chunk_tokens (list[int]): K_i per chunk.
    """

    def __init__(self, chunk_ratios: list[float], chunk_tokens: list[int], num_layers: int) -> None:
        self.chunk_tokens = chunk_tokens
        self.num_layers = num_layers
        planned = torch.tensor(chunk_ratios, dtype=torch.float64) * torch.tensor(chunk_tokens) * num_layers
        self.planned = planned.cumsum(0).tolist()  # planned total through each chunk
        self.kept = 0

    def ratio(self, index: int) -> float:
        """Chunk `index`'s effective ratio, given what earlier chunks kept."""
        later_minimum = self.num_layers * (len(self.chunk_tokens) - 1 - index)
        allowance = min(self.planned[index], self.planned[-1] - later_minimum) - self.kept
        return min(1.0, max(0.0, allowance / (self.num_layers * self.chunk_tokens[index])))

    def spend(self, kept: list[int]) -> None:
        self.kept += sum(kept)


# ---- 5. selection -----------------------------------------------------------------------------------


def select_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending (temporal) order: `[keep]` int64."""
    return scores.topk(keep).indices.sort().values


# ---- 6. attention: per-layer bottom-right causal mask, and scoring of the chunk ---------------------


@dataclass
class ChunkScratch:
    """What one chunk's forward leaves for the allocation: per layer, the prompt-to-video scores.

    Args:
        num_video (int): K, the chunk's video tokens, right before
        num_prompt (int): P, the guide prompt's tokens, at the end of the forward's input.
    """

    num_video: int
    num_prompt: int
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


def bottom_right_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """`[1, 1, q_len, kv_len]` bool: query i sees every key up to its own, aligned to the END of the keys,
    since the cache is shorter than the uncompressed positions once tokens were dropped."""
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return (cols <= rows + offset)[None, None]


def adaretake_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with a mask built from THIS layer's key length, plus optional scoring.

    A `ChunkScratch` in kwargs["adaretake"] collects prompt-to-video scores; an `EvidenceScratch` in
    kwargs["evidence"] collects attention mass on cached video tokens; a `BatchedCache` in kwargs["batch"]
    (`worker.engine.batch`) masks each row's padding and hands each row's attention to its evidence.
    """
    chunk: ChunkScratch | None = kwargs.pop("adaretake", None)
    evidence: EvidenceScratch | None = kwargs.pop("evidence", None)
    batch = kwargs.pop("batch", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    if batch is not None:
        batch.observe(module.layer_idx, query, key, scaling)
        mask = batch.attention_mask(module.layer_idx, q_len)
        return sdpa_attention_forward(
            module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if chunk is not None:
        chunk.scores[module.layer_idx] = prompt_to_video_scores(
            query, key, chunk.num_video, chunk.num_prompt, scaling
        )
    if evidence is not None:
        evidence.collect(module.layer_idx, query, key, scaling)
    # sdpa_attention_forward would align an implicit causal mask top-left (and even crop the keys), so any
    # multi-token query against a longer cache gets an explicit bottom-right mask.
    mask = None if q_len == 1 or q_len == kv_len else bottom_right_causal_mask(q_len, kv_len, query.device)
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _no_model_mask(*args, **kwargs):
    """Layers keep different numbers of tokens, so one model-wide mask cannot be right for all of them:
    the attention function builds each layer's mask from its own key length instead."""
    return None


ATTENTION_NAME = "adaretake_sdpa"
AttentionInterface.register(ATTENTION_NAME, adaretake_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_model_mask)


# ---- 7. dropping tokens from the cache --------------------------------------------------------------


def compress_chunk(
    cache: DynamicCache, scores: torch.Tensor, keep: list[int], num_video: int, num_prompt: int
) -> list[torch.Tensor]:
    """Drop the guide prompt's K/V and keep `keep[l]` of the chunk's video tokens in layer l, in temporal
    order, with their original rotary positions (keys are not re-rotated).

    Args:
        cache (DynamicCache): each layer ends with [chunk video K tokens][guide prompt P tokens].
        scores (torch.Tensor): `[layers, K]`.

    Returns:
        list[torch.Tensor]: per layer, the kept indices within the chunk `[keep_l]`.
    """
    kept = []
    for layer_idx, layer in enumerate(cache.layers):
        index = select_tokens(scores[layer_idx], keep[layer_idx]).to(layer.keys.device)
        past = layer.keys.shape[2] - num_video - num_prompt
        layer.keys = torch.cat([layer.keys[:, :, :past], layer.keys[:, :, past:][:, :, index]], dim=2)
        layer.values = torch.cat([layer.values[:, :, :past], layer.values[:, :, past:][:, :, index]], dim=2)
        kept.append(index.cpu())
    return kept


def chunk_keep_counts(scores: torch.Tensor, ratio: float, config: CompressionConfig) -> list[int]:
    """How many of a chunk's video tokens each layer keeps, given the chunk's ratio."""
    num_video = scores.shape[1]
    ratios = layer_ratios(scores, ratio, config.layer_allocation)
    if config.temporal_allocation == "reference":
        return reference_keep_counts(scores, ratios, num_video, config.heavy_hitter_alpha)
    return keep_counts(ratios, num_video)


def stack_scores(scratch: ChunkScratch, num_layers: int) -> torch.Tensor:
    """`[layers, K]` from the per-layer scores the attention function left."""
    missing = [i for i in range(num_layers) if i not in scratch.scores]
    if missing:
        raise RuntimeError(f"no scores from layers {missing}: is the model on {ATTENTION_NAME!r} attention?")
    return torch.stack([scratch.scores[i] for i in range(num_layers)]).cpu()


def chunk_token_counts(grid_t: int, tokens_per_grid: int, chunk_grids: int) -> list[int]:
    """Video tokens in each prefill chunk (the last may be short)."""
    return [min(chunk_grids, grid_t - start) * tokens_per_grid for start in range(0, grid_t, chunk_grids)]


def chunk_distances(grid_distances: torch.Tensor, chunk_grids: int) -> torch.Tensor:
    """Mean adjacent-grid distance of each chunk: `[num_chunks]`. The video's first grid has no
    predecessor, so it is left out of the first chunk's mean rather than counted as a distance of 0."""
    chunks = list(grid_distances.split(chunk_grids))
    chunks[0] = chunks[0][1:] if len(chunks[0]) > 1 else grid_distances[1:]
    overall = grid_distances[1:].mean() if len(grid_distances) > 1 else torch.tensor(0.0)
    return torch.stack([c.mean() if len(c) else overall for c in chunks])
