"""Evidence: where in the video an answer looked, as a share of attention per sampled frame.

The question's prefill over the cached video is what points at the moment: while an answer is decoded its
attention drifts to frames that are salient but beside the point, and after compression that drift decides
the top moment in a third to half of the answers (docs/benchmarks.md, grounding). So by default the timeline
comes from the question's tokens only (`EvidenceConfig.source`), and from the heads a checkpoint's
calibration found to localise best (`videoqa calibrate-evidence`, written to its `videoqa.json`); without a
calibration, from every head of every layer.

An `EvidenceScratch` collects, during the forwards, the queries and the keys they attended to; once the
answer is complete `video_mass()` measures, in one product per layer, the attention each head put on each
cached video token. Measuring per decoded token instead would run a second attention product and softmax
per layer on the hot path: a quarter of a decode step with the tiny model, several small kernels per layer
on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.engine.artifact import CompressedKV

SOURCES = ("question", "answer")
AGGREGATES = ("peak", "sum")


@dataclass(frozen=True)
class EvidenceConfig:
    """Which attention makes the evidence timeline.

    Args:
        source (str): "question": the question's prefill (history, question, assistant header) over the
            cached video; "answer": the question's and every answer token's, as before calibration existed.
        heads (tuple[tuple[int, int], ...]): the (layer, query head) pairs averaged; empty: all of them.
        aggregate (str): a frame's evidence is "peak": the attention of its most attended token, or "sum":
            of all its tokens (as before). A compressed cache keeps many tokens of some frames and one of
            others, and a sum follows those counts: on the needle checkpoints at 10% of the tokens, "sum"
            put the top moment on the needle in 57-60% of the answers and "peak" in 82-85%.
        smooth_seconds (float): each frame's evidence is the mean over the frames within this many seconds of
            it: a moment lasts, and a compressed cache may keep the token that shows it in one of its frames
            and not the next. On needle videos of the train split (shapes on screen 1-2 s, 2 fps) at 10% of
            the tokens, 1 s put the top moment on the needle 5 points more often than none, 1-4 points more
            than 0.5 or 1.5 s; 2 s did worse than none. 0: none.
    """

    source: str = "question"
    heads: tuple[tuple[int, int], ...] = ()
    aggregate: str = "peak"
    smooth_seconds: float = 1.0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"evidence source must be one of {SOURCES}, got {self.source!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"evidence aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not self.smooth_seconds >= 0:
            raise ValueError(f"evidence smooth_seconds must be at least 0, got {self.smooth_seconds!r}")

    @classmethod
    def from_settings(cls, settings: dict) -> EvidenceConfig:
        """From the `evidence` entry of a checkpoint's `videoqa.json` (`{"heads": [[layer, head], ...]}`)."""
        unknown = set(settings) - {"source", "heads", "aggregate", "smooth_seconds", "calibration"}
        if unknown:
            raise ValueError(f"unknown evidence settings: {', '.join(sorted(unknown))}")
        heads = tuple((int(layer), int(head)) for layer, head in settings.get("heads", ()))
        defaults = cls()
        return cls(
            settings.get("source", defaults.source),
            heads,
            settings.get("aggregate", defaults.aggregate),
            float(settings.get("smooth_seconds", defaults.smooth_seconds)),
        )

    def layer_heads(self, num_layers: int, num_heads: int) -> dict[int, list[int]]:
        """{layer: [query heads]} of the pairs used."""
        if not self.heads:
            return {layer: list(range(num_heads)) for layer in range(num_layers)}
        chosen: dict[int, list[int]] = {}
        for layer, head in self.heads:
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise ValueError(
                    f"evidence head ({layer}, {head}) is outside {num_layers} layers x {num_heads} heads"
                )
            chosen.setdefault(layer, []).append(head)
        return chosen


# Every head, question and answer tokens, summed per frame: the timeline before calibration existed.
LEGACY = EvidenceConfig(source="answer", aggregate="sum", smooth_seconds=0.0)


@dataclass
class EvidenceScratch:
    """Collects, per layer, the queries of the question and answer tokens and the keys they attended to,
    measured once the answer is complete; or, without `answer_tokens`, measures the question's prefill (the
    first forward) at once and keeps nothing of the cache: a batched prefill's keys are views of the whole
    batch, which holding until the answer ends would keep alive.

    Args:
        video_slices (dict[int, slice]): per layer, where its cached video tokens sit among the keys.
        answer_tokens (bool): the decoding steps' queries count too (`LEGACY`); else only the question's.
    """

    video_slices: dict[int, slice]
    answer_tokens: bool = True
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # Per layer, the newest keys the queries attended to: the cache only grows, so earlier keys are their
    # prefix.
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: float = 1.0
    measured: dict[int, torch.Tensor] = field(default_factory=dict)  # without answer_tokens

    def collect(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if not self.answer_tokens:
            if layer_idx not in self.measured:
                self.measured[layer_idx] = self._layer_mass(layer_idx, query, key, scaling)
            return
        self.queries.setdefault(layer_idx, []).append(query)
        self.keys[layer_idx] = key
        self.scaling = scaling

    def video_mass(self, block: int = 8) -> dict[int, torch.Tensor]:
        """Per layer `[heads, video keys]`: each head's attention probabilities (softmax in fp32, summed over
        the queries) on its video keys, each query against the keys it saw: those up to its own."""
        if not self.answer_tokens:
            return dict(self.measured)
        return {
            layer: self._layer_mass(layer, torch.cat(queries, dim=2), self.keys[layer], self.scaling, block)
            for layer, queries in self.queries.items()
        }

    def _layer_mass(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, block: int = 8
    ) -> torch.Tensor:
        """`video_mass` of one layer's queries `[1, heads, Q, d]`, aligned to the end of `key`
        `[1, kv_heads, K, d]`. Queries go `block` at a time, which bounds the fp32 probabilities to
        `[heads, block, keys]`: on this CPU 8 was the fastest of 1 to 64 with the tiny model's 16 000-token
        layers (the block stays in cache), 2x slower than 16 at 7B widths, still 2x faster than one query
        at a time."""
        q_len, kv_len = query.shape[2], key.shape[2]
        video = self.video_slices[layer_idx]
        total = None
        for start in range(0, q_len, block):
            rows = query[:, :, start : start + block]
            seen = kv_len - q_len + start + rows.shape[2]  # the block's last query sees keys [0, seen)
            probs = _video_probabilities(rows, key[:, :, :seen], scaling, video)
            total = probs if total is None else total.add_(probs)
        return total


def _video_probabilities(query, key, scaling, video: slice) -> torch.Tensor:
    """`[heads, video keys]`: attention probabilities (softmax in fp32, summed over the queries) of `query`
    `[1, heads, q, d]` on `key[video]`, the queries aligned to the end of `key` `[1, kv_heads, kv, d]`
    (bottom-right causal)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    group = heads // kv_heads  # heads [i * group, (i + 1) * group) share kv head i
    # Scaled queries times keys in the cache's dtype, softmax in fp32: upcasting the layer's whole cached
    # keys would copy the cache in fp32, scaling the products would be one more pass over them.
    queries = query[0].reshape(kv_heads, group * q_len, -1) * scaling
    logits = torch.bmm(queries, key[0].transpose(1, 2)).view(kv_heads, group, q_len, kv_len)
    if q_len > 1:  # query i sees the keys up to kv_len - q_len + i: only the last q_len columns differ
        hidden = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu(1)
        logits[..., kv_len - q_len :].masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [kv_heads, group, q, kv]
    return probs[..., video].sum(dim=2).reshape(heads, -1)  # [heads, video]


def leading_text(artifact: CompressedKV) -> int:
    """The cached tokens before the first video token (text0)."""
    frames = artifact.token_frames[0]
    video = (frames >= 0).nonzero()
    return int(video[0]) if len(video) else len(frames)


def scratch_for(artifact: CompressedKV, config: EvidenceConfig) -> tuple[int, EvidenceScratch]:
    """The artifact's leading text tokens and a scratch over each layer's tokens after them."""
    text0 = leading_text(artifact)
    slices = {i: slice(text0, n) for i, n in enumerate(artifact.lengths)}
    return text0, EvidenceScratch(video_slices=slices, answer_tokens=config.source == "answer")


def head_timelines(
    artifact: CompressedKV, video_mass: dict[int, torch.Tensor], text0: int, aggregate: str = "peak"
) -> torch.Tensor:
    """`[layers, heads, frames]` float64, each row summing to 1: each head's mass on its layer's video
    tokens, per frame (a token stands for both frames of its temporal grid; tokens of no frame, such as
    text between re-read windows, are left out) the most attended token's ("peak") or the sum over the
    frame's tokens ("sum")."""
    num_frames = len(artifact.timestamps)
    layers = sorted(video_mass)
    num_heads = video_mass[layers[0]].shape[0]
    out = torch.zeros(len(layers), num_heads, num_frames, dtype=torch.float64)
    for row, layer_idx in enumerate(layers):
        frames = artifact.token_frames[layer_idx][text0:].long()
        mass = video_mass[layer_idx].double().cpu()  # [heads, video]
        video = frames >= 0
        frames, mass = frames[video], mass[:, video]
        share = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)
        for step in range(2):  # the grid's two frames (the last grid may have one)
            target = (frames + step).clamp_max(num_frames - 1).expand(num_heads, -1)
            if aggregate == "peak":
                out[row].scatter_reduce_(1, target, share, reduce="amax")
            else:
                out[row].scatter_add_(1, target, share / 2)
        out[row] /= out[row].sum(dim=1, keepdim=True).clamp_min(1e-30)
    return out


def evidence_timeline(
    artifact: CompressedKV, video_mass: dict[int, torch.Tensor], text0: int, config: EvidenceConfig
) -> list[tuple[float, float]]:
    """Share of the evidence on each sampled frame: per layer, the mass of its chosen heads made a
    per-frame timeline (`head_timelines`), then the layers averaged, each weighted by its number of
    chosen heads (every head: every layer alike), then smoothed over `config.smooth_seconds`."""
    num_layers, num_frames = artifact.num_layers, len(artifact.timestamps)
    num_heads = next(iter(video_mass.values())).shape[0]
    total = torch.zeros(num_frames, dtype=torch.float64)
    weight = 0
    for layer_idx, heads in config.layer_heads(num_layers, num_heads).items():
        layer = {layer_idx: video_mass[layer_idx][heads].sum(dim=0, keepdim=True)}
        total += len(heads) * head_timelines(artifact, layer, text0, config.aggregate)[0, 0]
        weight += len(heads)
    total /= max(1, weight)
    total = smoothed(total, artifact.timestamps, config.smooth_seconds)
    return [(t, float(s)) for t, s in zip(artifact.timestamps, total.tolist(), strict=True)]


def smoothed(shares: torch.Tensor, timestamps: list[float], seconds: float) -> torch.Tensor:
    """Each frame's share replaced by the mean over the frames within `seconds` of it (timestamps ascending),
    then scaled to sum as before."""
    if seconds <= 0 or len(timestamps) < 2:
        return shares
    times = torch.tensor(timestamps, dtype=torch.float64)
    first = torch.searchsorted(times, times - seconds - 1e-9)  # [frames]: the window's first frame
    last = torch.searchsorted(times, times + seconds + 1e-9, right=True)  # one past its last
    running = torch.cat([shares.new_zeros(1), shares.cumsum(0)])
    means = (running[last] - running[first]) / (last - first)
    return means * (shares.sum() / means.sum().clamp_min(1e-30))


def top_moments(timeline: list[tuple[float, float]], k: int) -> list[tuple[float, float]]:
    """The `k` highest-share (timestamp, share), best first."""
    return sorted(timeline, key=lambda item: -item[1])[:k]
