"""worker.tools.shapes: the real architectures, and their reduction to a depth this machine can run."""

import pytest

from worker.tools.plan import kv_bytes_per_token_layer
from worker.tools.shapes import QWEN2_5_VL_7B, QWEN2_5_VL_72B, QWEN2_VL_7B, SHAPES, reduced


def test_the_shapes_are_the_published_ones():
    assert set(SHAPES) == {"7b", "72b", "qwen2-7b"}
    for shape in (QWEN2_5_VL_7B, QWEN2_VL_7B):
        text = shape.text
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_key_value_heads"]) == (3584, 28, 4)
        assert text["hidden_size"] // text["num_attention_heads"] == 128 and text["vocab_size"] == 152064
    assert QWEN2_5_VL_72B.text["num_hidden_layers"] == 80 and QWEN2_5_VL_72B.vision["out_hidden_size"] == 8192


def test_kv_bytes_per_token_are_those_of_adaretake_md_section_8():
    # 2 x 28 layers x 4 KV heads x 128 x 2 bytes = 57 344; 72B: 80 layers x 8 KV heads = 320 KiB.
    assert 28 * kv_bytes_per_token_layer(QWEN2_5_VL_7B.text) == 57_344
    assert 28 * kv_bytes_per_token_layer(QWEN2_VL_7B.text) == 57_344
    assert 80 * kv_bytes_per_token_layer(QWEN2_5_VL_72B.text) == 320 * 1024


def test_reduced_keeps_widths_and_a_full_attention_block():
    small = reduced(QWEN2_5_VL_7B, layers=2, vision_blocks=4)
    assert small.num_layers == 2 and small.vision_depth == 4
    assert small.vision["fullatt_block_indexes"] == [3]  # three windowed blocks, then a full one
    assert reduced(QWEN2_5_VL_7B, vision_blocks=16).vision["fullatt_block_indexes"] == [7, 15]
    assert {k: v for k, v in small.text.items() if k not in ("num_hidden_layers", "max_window_layers")} == {
        k: v for k, v in QWEN2_5_VL_7B.text.items() if k not in ("num_hidden_layers", "max_window_layers")
    }
    assert "fullatt_block_indexes" not in reduced(QWEN2_VL_7B, 1, 2).vision
    assert QWEN2_5_VL_7B.vision["fullatt_block_indexes"] == [7, 15, 23, 31]  # the original is untouched


@pytest.mark.parametrize(("layers", "blocks"), [(0, 4), (29, 4), (2, 0), (2, 33)])
def test_reduced_rejects_impossible_depths(layers, blocks):
    with pytest.raises(ValueError, match="must be between 1 and"):
        reduced(QWEN2_5_VL_7B, layers, blocks)
