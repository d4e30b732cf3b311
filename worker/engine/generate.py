"""M-RoPE positions, prefill and decoding on the language model, with explicit positions.

Positions are always passed explicitly: `generate()` would derive them from the physical cache
length, which stops matching the real positions once video tokens are evicted from the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from worker.engine.models import LoadedModel
from worker.engine.token_sampling import GREEDY, TokenSampling, choose_token


def multimodal_position_ids(
    loaded: LoadedModel,
    num_text0: int,
    grid_thw: tuple[int, int, int],
    seconds_per_grid: float,
    num_text1: int,
) -> torch.Tensor:
    """3-D M-RoPE positions of `[text0][video][text1]`.

    text0 and the video come from the model's own index function. text1 starts right after the largest
    video position, as in Qwen's reference implementation and training: transformers 5.24 instead resumes
    text at text0 + max(grid_h, grid_w) / merge, which for a video overlaps its temporal positions (and
    disagrees with its own rope deltas used when decoding).

    Args:
        grid_thw: the whole video's grid in patches (grid_t, grid_h, grid_w).
        seconds_per_grid (float): seconds spanned by one temporal grid (Qwen2.5-VL's absolute time axis).

    Returns:
        torch.Tensor: `[3, num_text0 + num_video_tokens + num_text1]` int64 on the model's device.
    """
    merge = loaded.vision.merge_size
    num_video = grid_thw[0] * (grid_thw[1] // merge) * (grid_thw[2] // merge)
    token_types = torch.zeros(1, num_text0 + num_video, dtype=torch.int32)
    token_types[0, num_text0:] = 2  # 2 = video, as the processor marks it
    input_ids = torch.where(token_types == 2, loaded.video_token_id, 0).long()
    kwargs = {"second_per_grid_ts": torch.tensor([seconds_per_grid])} if loaded.family == "qwen2_5_vl" else {}
    position_ids, _ = loaded.model.model.get_rope_index(
        input_ids, mm_token_type_ids=token_types, video_grid_thw=torch.tensor([grid_thw]), **kwargs
    )
    head = position_ids[:, 0]  # [3, num_text0 + num_video]
    tail = (head.max() + 1 + torch.arange(num_text1)).expand(3, -1)  # [3, num_text1]
    return torch.cat([head, tail], dim=1).to(loaded.device)


def embed_tokens(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    """`[1, len(token_ids), hidden_size]` input embeddings."""
    ids = torch.tensor([token_ids], device=loaded.device)
    return loaded.model.get_input_embeddings()(ids)


def new_cache(loaded: LoadedModel) -> DynamicCache:
    return DynamicCache(config=loaded.model.config.get_text_config())


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers allocated once, with room for `capacity`
    tokens: `update` copies the new states in place and returns views of the filled part, where
    `DynamicLayer` concatenates (a new tensor of the whole layer for every generated token). Past the
    capacity the buffers double (one copy), so a wrong estimate costs time, never correctness.

    `keys` / `values` are always exactly the filled part, so attention, masks and `get_seq_length` see
    what they see with a `DynamicLayer`.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = self._new_buffer(key_states, self.capacity)
        self._value_buffer = self._new_buffer(value_states, self.capacity)
        self.is_initialized = True

    @staticmethod
    def _new_buffer(states: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, head_dim = states.shape
        return states.new_empty((batch, heads, capacity, head_dim))  # [batch, kv_heads, capacity, head_dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self._key_buffer[:, :, self.length : end].copy_(key_states)
        self._value_buffer[:, :, self.length : end].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self._set_length(max(0, self.length + tokens_to_remove))

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._key_buffer[:, :, :length]  # a view: no copy
        self.values = self._value_buffer[:, :, :length]

    def _grow(self, capacity: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = self._new_buffer(old, capacity)
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)
        self.capacity = capacity


def preallocated_cache(capacities: list[int]) -> Cache:
    """A cache of `PreallocatedLayer`s, one per language-model layer, each with room for `capacities[i]`
    tokens (e.g. a cached video's length + the question + `max_new_tokens`)."""
    return Cache(layers=[PreallocatedLayer(capacity) for capacity in capacities])


@torch.inference_mode()
def forward(
    loaded: LoadedModel,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
    **kwargs,
) -> torch.Tensor:
    """Run the language model over `inputs_embeds` `[1, seq, hidden]` at `position_ids` `[3, seq]`, appending
    to `cache`; returns the last token's logits `[vocab]` in float32."""
    hidden = loaded.model.model.language_model(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids[:, None, :],
        cache=cache,
        use_cache=True,
        **kwargs,
    ).last_hidden_state
    return loaded.model.lm_head(hidden[0, -1]).float()


class IncrementalText:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._delta(final=False)

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # a multi-byte character split across tokens: wait
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class DecodeStream:
    """Decoding one step at a time: the token each step's logits choose (`choose_token`: greedy unless
    `sampling` says otherwise), its text streamed, and when the answer ends (an end-of-turn token, a stop
    string, or `max_new_tokens`). `greedy_decode` feeds it from one cache; the scheduler feeds one per row
    of a batched decode step.

    Text that may be the start of a stop string is held back until the next tokens tell; the answer ends
    before the first stop string, which is never shown (`answer_text`), while `token_ids` keep every
    generated token.

    Args:
        on_text: receives decoded text as it is generated.
        on_step: receives each step's logits `[vocab]` (float32), the prefill's included.
        sampling (TokenSampling): how tokens are chosen, and the stop strings.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
        on_step: Callable[[torch.Tensor], None] | None = None,
        sampling: TokenSampling = GREEDY,
    ) -> None:
        self.text = IncrementalText(loaded.tokenizer)
        self.eos_token_ids = loaded.eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.on_text = on_text
        self.on_step = on_step
        self.sampling = sampling
        self.generator = sampling.generator()
        self.shown = 0  # characters of the text given to on_text
        self.done = False

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids, without the end-of-turn token."""
        return self.text.token_ids

    @property
    def answer_text(self) -> str:
        """The answer's text so far: everything decoded, up to the first stop string."""
        text = self.text.emitted
        return text[: self._stop_at(text)]

    def push(self, logits: torch.Tensor) -> int | None:
        """The token to feed next, chosen by `logits` `[vocab]`; None once the answer is complete."""
        if len(self.token_ids) >= self.max_new_tokens:
            return self._finish()
        if self.on_step is not None:
            self.on_step(logits)
        token_id = choose_token(logits, self.sampling, self.generator)
        if token_id in self.eos_token_ids:
            return self._finish()
        self.text.push(token_id)
        if self._stop_at(self.text.emitted) is not None or len(self.token_ids) == self.max_new_tokens:
            return self._finish()
        self._show(self._held_back(self.text.emitted))
        return token_id

    def _finish(self) -> None:
        self.text.finish()
        self._show(held_back=0)
        self.done = True

    def _show(self, held_back: int) -> None:
        """Give on_text what is new of `answer_text`, but the last `held_back` characters."""
        text = self.answer_text
        end = len(text) - held_back
        if end > self.shown:
            delta, self.shown = text[self.shown : end], end
            if self.on_text is not None:
                self.on_text(delta)

    def _stop_at(self, text: str) -> int | None:
        found = [at for stop in self.sampling.stop if (at := text.find(stop)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` may begin a stop string."""
        return max((k for stop in self.sampling.stop for k in range(1, len(stop)) if text.endswith(stop[:k])),
                   default=0)  # fmt: skip


@torch.inference_mode()
def greedy_decode(
    loaded: LoadedModel,
    cache: DynamicCache,
    logits: torch.Tensor,
    next_position: int,
    max_new_tokens: int,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    **forward_kwargs,
) -> list[int]:
    """Greedy decoding after a prefill.

    Args:
        cache (DynamicCache): the prefilled cache; generated tokens are appended to it.
        logits (torch.Tensor): `[vocab]` logits of the last prefilled token.
        next_position (int): M-RoPE position of the first generated token (a text position, equal on
            all 3 axes).
        on_text, on_step: as for `DecodeStream`.
        forward_kwargs: passed to every decoding step's forward (and so to the attention function).

    Returns:
        list[int]: generated token ids, without the end-of-turn token.
    """
    stream = DecodeStream(loaded, max_new_tokens, on_text, on_step)
    token_id = stream.push(logits)
    while token_id is not None:
        position = torch.full((3, 1), next_position + len(stream.token_ids) - 1, device=loaded.device)
        logits = forward(loaded, embed_tokens(loaded, [token_id]), position, cache, **forward_kwargs)
        token_id = stream.push(logits)
    return stream.token_ids
