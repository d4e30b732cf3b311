"""The decoding cache: generated tokens are written into space allocated once, with DynamicLayer's results."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from worker.engine.generate import PreallocatedLayer


def states(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # [1, kv_heads, seq, head_dim] keys and values
    return tuple(torch.randn(1, 2, tokens, 8, generator=generator) for _ in range(2))


def test_updates_match_dynamic_layer_and_reuse_one_buffer():
    layer, reference = PreallocatedLayer(capacity=20 + 3 + 5), DynamicLayer()
    steps = [states(20, 0), states(3, 1)] + [states(1, seed) for seed in range(2, 7)]
    pointers = set()
    for keys, values in steps:
        got, expected = layer.update(keys, values), reference.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert layer.get_seq_length() == reference.get_seq_length()
        pointers.add(layer.keys.data_ptr())
    assert len(pointers) == 1  # every step wrote into the same storage: nothing was reallocated


def test_past_capacity_it_grows_and_crop_discards_the_tail():
    layer, reference = PreallocatedLayer(capacity=4), DynamicLayer()
    for seed, tokens in enumerate((3, 2, 6)):
        keys, values = states(tokens, seed)
        layer.update(keys, values)
        reference.update(keys, values)
    assert layer.capacity >= 11 and torch.equal(layer.keys, reference.keys)
    layer.crop(-4)
    reference.crop(-4)
    assert torch.equal(layer.values, reference.values) and layer.get_seq_length() == 7
    keys, values = states(1, 9)  # written over the cropped tail
    assert torch.equal(layer.update(keys, values)[0], reference.update(keys, values)[0])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
