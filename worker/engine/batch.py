"""One forward for several answers at once, each over its own cache: a decode step (one token per row) or
the prefill of several questions (each its own number of tokens).

Answers about different videos hold caches of different lengths, and within one compressed cache every layer
keeps its own number of video tokens. A `BatchedCache` pads each layer to its longest row: row b's keys of
layer l sit in `[b, :, :length[b, l]]` of one `[rows, kv_heads, capacity_l, head_dim]` buffer, and each
forward's attention masks the padding out. The new tokens of each row are written right after that row's own
tokens, so rows never need to be aligned; a row fed fewer tokens than the longest is right-padded, and its
padding is neither seen by any real token nor kept (the row's length grows by its real tokens only).

Rows join and leave between steps by building a new `BatchedCache` from the rows' current keys (one copy of
the active caches, per change of the batch, never per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from worker.engine.evidence import EvidenceScratch
from worker.engine.models import LoadedModel


@dataclass
class Row:
    """One answer's cache as it enters a batch.

    Args:
        keys, values (list[torch.Tensor]): per layer `[1, kv_heads, len_l, head_dim]`.
        room (int): tokens the row may still append (its remaining answer).
        evidence (EvidenceScratch): collects the row's queries and keys for its evidence, or None.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    room: int
    evidence: EvidenceScratch | None = None


class BatchedLayer(DynamicLayer):
    """One layer of a `BatchedCache`: rows padded to the longest, each appended at its own length.
    `keys` / `values` are views of the buffers up to the longest row (what attention reads)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], rooms: list[int]) -> None:
        super().__init__()
        first = keys[0]
        self.lengths = [k.shape[2] for k in keys]
        capacity = max(n + room for n, room in zip(self.lengths, rooms, strict=True))
        shape = (len(keys), first.shape[1], capacity, first.shape[3])  # [rows, kv_heads, capacity, head_dim]
        self._key_buffer = first.new_zeros(shape)
        self._value_buffer = first.new_zeros(shape)
        for row, (k, v) in enumerate(zip(keys, values, strict=True)):
            self._key_buffer[row, :, : k.shape[2]] = k[0]
            self._value_buffer[row, :, : v.shape[2]] = v[0]
        self._lengths = torch.tensor(self.lengths, device=first.device)
        self._rows = torch.arange(len(keys), device=first.device)
        self.device, self.is_initialized = first.device, True
        self.feed([1] * len(keys))
        self._set_views()

    def feed(self, counts: list[int]) -> None:
        """The next forward brings `counts[b]` real tokens for row b, padded to `max(counts)`."""
        self.counts = counts
        self._counts = torch.tensor(counts, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the forward's tokens (`[rows, kv_heads, q, head_dim]`), each row's after its own tokens."""
        q = key_states.shape[2]
        at = self._lengths[:, None] + torch.arange(q, device=self.device)  # [rows, q]
        self._key_buffer[self._rows[:, None], :, at] = key_states.transpose(1, 2)  # [rows, q, kv_heads, d]
        self._value_buffer[self._rows[:, None], :, at] = value_states.transpose(1, 2)
        self._lengths += self._counts
        self.lengths = [n + count for n, count in zip(self.lengths, self.counts, strict=True)]
        self._set_views()
        return self.keys, self.values

    def attention_mask(self, q_len: int) -> torch.Tensor | None:
        """`[rows, 1, q_len, keys]` bool for the forward just appended: row b's query i sees the row's
        earlier tokens and its own first i + 1 new ones (a padding query sees all of the row's); None when
        that is every key for every query (one token per row, no row padded)."""
        longest = self.keys.shape[2]
        if q_len == 1 and min(self.lengths) == longest:
            return None
        steps = torch.arange(q_len, device=self.device)
        counts = self._counts[:, None]  # [rows, 1]
        seen = self._lengths[:, None] - counts + 1 + torch.minimum(steps, counts - 1)  # [rows, q]
        return (torch.arange(longest, device=self.device) < seen[:, :, None])[:, None]  # [rows, 1, q, keys]

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row `index`'s keys and values, `[1, kv_heads, len, head_dim]` views."""
        length = self.lengths[index]
        return (
            self._key_buffer[index : index + 1, :, :length],
            self._value_buffer[index : index + 1, :, :length],
        )

    def _set_views(self) -> None:
        longest = max(self.lengths)
        self.keys = self._key_buffer[:, :, :longest]
        self.values = self._value_buffer[:, :, :longest]


class BatchedCache(Cache):
    """The caches of several answers, one `BatchedLayer` per language-model layer."""

    def __init__(self, rows: list[Row]) -> None:
        rooms = [row.room for row in rows]
        layers = [
            BatchedLayer([row.keys[i] for row in rows], [row.values[i] for row in rows], rooms)
            for i in range(len(rows[0].keys))
        ]
        super().__init__(layers=layers)
        self.evidence = [row.evidence for row in rows]

    def rows(self, indices: list[int], rooms: list[int]) -> list[Row]:
        """The rows at `indices` (views into this cache), to build the next batch from."""
        return [
            Row(
                *map(list, zip(*(layer.row(i) for layer in self.layers), strict=True)), room, self.evidence[i]
            )
            for i, room in zip(indices, rooms, strict=True)
        ]

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Hand each row's real queries `[1, heads, count, d]` and keys to its evidence (from the attention
        function)."""
        layer = self.layers[layer_idx]
        for row, evidence in enumerate(self.evidence):
            if evidence is not None:
                evidence.collect(
                    layer_idx,
                    query[row : row + 1, :, : layer.counts[row]],
                    key[row : row + 1, :, : layer.lengths[row]],
                    scaling,
                )

    def attention_mask(self, layer_idx: int, q_len: int) -> torch.Tensor | None:
        return self.layers[layer_idx].attention_mask(q_len)


@torch.inference_mode()
def batched_forward(
    loaded: LoadedModel, cache: BatchedCache, token_ids: list[list[int]], positions: list[int]
) -> torch.Tensor:
    """Feed row b its `token_ids[b]` from the M-RoPE text position `positions[b]` (equal on all 3 axes),
    appending them to its cache; returns the logits after each row's last token, `[rows, vocab]` in
    float32. One token per row is a decode step; a question each is their prefill."""
    counts = [len(ids) for ids in token_ids]
    q_len = max(counts)
    padded = torch.tensor([ids + ids[-1:] * (q_len - len(ids)) for ids in token_ids], device=loaded.device)
    steps = torch.arange(q_len, device=loaded.device)
    position_ids = (torch.tensor(positions, device=loaded.device)[:, None] + steps).expand(3, -1, -1)
    for layer in cache.layers:
        layer.feed(counts)
    hidden = loaded.model.model.language_model(
        inputs_embeds=loaded.model.get_input_embeddings()(padded),  # [rows, q, hidden]
        position_ids=position_ids,  # [3, rows, q]
        cache=cache,
        use_cache=True,
        batch=cache,
    ).last_hidden_state  # [rows, q, hidden]
    last = hidden[torch.arange(len(counts)), torch.tensor(counts) - 1]  # [rows, hidden]
    return loaded.model.lm_head(last).float()
