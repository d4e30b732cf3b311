"""One decode step for several answers at once, each over its own cache.

Answers about different videos hold caches of different lengths, and within one compressed cache every layer
keeps its own number of video tokens. A `BatchedCache` pads each layer to its longest row: row b's keys of
layer l sit in `[b, :, :length[b, l]]` of one `[rows, kv_heads, capacity_l, head_dim]` buffer, and each
step's attention masks the padding out. The new token of each row is written right after that row's own
tokens, so rows never need to be aligned.

Rows join and leave between steps by building a new `BatchedCache` from the rows' current keys (one copy of
the active caches, per change of the batch, never per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from worker.engine.adaretake import EvidenceScratch
from worker.engine.generate import embed_tokens
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
        self._set_views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append one token per row (`[rows, kv_heads, 1, head_dim]`), each after its own row's tokens."""
        self._key_buffer[self._rows, :, self._lengths] = key_states[:, :, 0]
        self._value_buffer[self._rows, :, self._lengths] = value_states[:, :, 0]
        self._lengths += 1
        self.lengths = [n + 1 for n in self.lengths]
        self._set_views()
        return self.keys, self.values

    def key_mask(self) -> torch.Tensor | None:
        """`[rows, 1, 1, keys]` bool, True where a row has a token; None when no row is padded."""
        longest = self.keys.shape[2]
        if min(self.lengths) == longest:
            return None
        return (torch.arange(longest, device=self.device) < self._lengths[:, None])[:, None, None]

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
        """Hand each row's query `[1, heads, 1, d]` and keys to its evidence (from the attention function)."""
        lengths = self.layers[layer_idx].lengths
        for row, evidence in enumerate(self.evidence):
            if evidence is not None:
                evidence.collect(
                    layer_idx, query[row : row + 1], key[row : row + 1, :, : lengths[row]], scaling
                )

    def key_mask(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].key_mask()


@torch.inference_mode()
def decode_step(
    loaded: LoadedModel, cache: BatchedCache, token_ids: list[int], positions: list[int]
) -> torch.Tensor:
    """Feed one token per row at its M-RoPE position (a text position, equal on all 3 axes), appending to
    each row's cache; returns the next logits `[rows, vocab]` in float32."""
    position_ids = torch.tensor(positions, device=loaded.device)[None, :, None].expand(
        3, -1, 1
    )  # [3, rows, 1]
    hidden = loaded.model.model.language_model(
        inputs_embeds=embed_tokens(loaded, token_ids).transpose(0, 1),  # [rows, 1, hidden]
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        batch=cache,
    ).last_hidden_state  # [rows, 1, hidden]
    return loaded.model.lm_head(hidden[:, -1]).float()
