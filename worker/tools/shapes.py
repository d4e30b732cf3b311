"""The real dimensions of Qwen2.5-VL-7B, Qwen2.5-VL-72B and Qwen2-VL-7B, as config.json-style dicts.

Plain data, no torch: `worker.tools.plan` sizes memory from them and `worker.tools.tiny.make_shaped` builds
random checkpoints of these widths at a reduced depth. Every number is copied from the public config.json of
the checkpoint named in `source`, or, where that file leaves a field out, from the default of the transformers
5.24 config class it falls back to (`Qwen2_5_VLVisionConfig`, `Qwen2VLVisionConfig`), whose defaults are the
7B towers. Token ids are not part of a shape: a built checkpoint takes them from its tokenizer.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """One checkpoint's architecture.

    Args:
        name (str): the short name used on the command line ("7b", "72b", "qwen2-7b").
        family (str): config.model_type, "qwen2_5_vl" or "qwen2_vl".
        model_id (str): the hub checkpoint these dimensions are from.
        source (str): where the numbers were read.
        text (dict): the text model's config.json fields.
        vision (dict): the vision tower's config.json fields.
    """

    name: str
    family: str
    model_id: str
    source: str
    text: dict = field(repr=False)
    vision: dict = field(repr=False)

    @property
    def num_layers(self) -> int:
        return self.text["num_hidden_layers"]

    @property
    def vision_depth(self) -> int:
        return self.vision["depth"]


# Shared by the three text models: M-RoPE (temporal, height, width) rotary pairs of a 128-wide head,
# rope_theta 1e6 and RMSNorm eps 1e-6 (all three config.json files).
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}

QWEN2_5_VL_7B = ModelShape(
    name="7b",
    family="qwen2_5_vl",
    model_id="Qwen/Qwen2.5-VL-7B-Instruct",
    source="huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json; vision fields it omits: "
    "the Qwen2_5_VLVisionConfig defaults (transformers 5.24), the same numbers as the released tower",
    text={
        "vocab_size": 152064,  # config.json
        "hidden_size": 3584,  # config.json
        "intermediate_size": 18944,  # config.json
        "num_hidden_layers": 28,  # config.json
        "num_attention_heads": 28,  # config.json: head_dim 3584 / 28 = 128
        "num_key_value_heads": 4,  # config.json: 7 query heads per KV head
        "max_position_embeddings": 128000,  # config.json
        "max_window_layers": 28,  # config.json (use_sliding_window is false)
        "rms_norm_eps": 1e-6,  # config.json
        "hidden_act": "silu",  # config.json
        "rope_parameters": _ROPE,  # config.json rope_scaling + rope_theta
    },
    vision={
        "depth": 32,  # Qwen2_5_VLVisionConfig default
        "hidden_size": 1280,  # config.json vision_config
        "intermediate_size": 3420,  # Qwen2_5_VLVisionConfig default
        "num_heads": 16,  # Qwen2_5_VLVisionConfig default
        "hidden_act": "silu",  # Qwen2_5_VLVisionConfig default
        "out_hidden_size": 3584,  # Qwen2_5_VLVisionConfig default = the text hidden size
        "patch_size": 14,  # config.json vision_config spatial_patch_size
        "spatial_merge_size": 2,  # Qwen2_5_VLVisionConfig default
        "temporal_patch_size": 2,  # Qwen2_5_VLVisionConfig default
        "window_size": 112,  # Qwen2_5_VLVisionConfig default: 8 x 8 patches per attention window
        "fullatt_block_indexes": [7, 15, 23, 31],  # Qwen2_5_VLVisionConfig default
        "tokens_per_second": 2,  # config.json vision_config
    },
)

QWEN2_5_VL_72B = ModelShape(
    name="72b",
    family="qwen2_5_vl",
    model_id="Qwen/Qwen2.5-VL-72B-Instruct",
    source="the config.json of Qwen/Qwen2.5-VL-72B-Instruct as republished with its weights quantised in "
    "huggingface.co/Qwen/Qwen2.5-VL-72B-Instruct-AWQ (the vision tower there is not quantised); vision "
    "fields it omits: the Qwen2_5_VLVisionConfig defaults (transformers 5.24)",
    text={
        "vocab_size": 152064,  # config.json
        "hidden_size": 8192,  # config.json
        "intermediate_size": 29696,  # config.json (Qwen2-VL-72B has 29568)
        "num_hidden_layers": 80,  # config.json
        "num_attention_heads": 64,  # config.json: head_dim 8192 / 64 = 128
        "num_key_value_heads": 8,  # config.json
        "max_position_embeddings": 128000,  # config.json
        "max_window_layers": 80,  # config.json
        "rms_norm_eps": 1e-6,  # config.json
        "hidden_act": "silu",  # config.json
        "rope_parameters": _ROPE,  # config.json rope_scaling + rope_theta
    },
    vision={
        **QWEN2_5_VL_7B.vision,  # the same tower as the 7B's, but for the three fields below
        "hidden_size": 1280,  # config.json vision_config
        "intermediate_size": 3456,  # config.json vision_config
        "out_hidden_size": 8192,  # config.json vision_config
    },
)

QWEN2_VL_7B = ModelShape(
    name="qwen2-7b",
    family="qwen2_vl",
    model_id="Qwen/Qwen2-VL-7B-Instruct",
    source="huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json; vision fields it omits: the "
    "Qwen2VLVisionConfig defaults (transformers 5.24), the released tower's numbers",
    text={
        "vocab_size": 152064,  # config.json
        "hidden_size": 3584,  # config.json
        "intermediate_size": 18944,  # config.json
        "num_hidden_layers": 28,  # config.json
        "num_attention_heads": 28,  # config.json
        "num_key_value_heads": 4,  # config.json
        "max_position_embeddings": 32768,  # config.json
        "max_window_layers": 28,  # config.json
        "rms_norm_eps": 1e-6,  # config.json
        "hidden_act": "silu",  # config.json
        "rope_parameters": _ROPE,  # config.json rope_scaling + rope_theta
    },
    vision={
        "depth": 32,  # Qwen2VLVisionConfig default
        "embed_dim": 1280,  # Qwen2VLVisionConfig default: the tower's width
        "hidden_size": 3584,  # Qwen2VLVisionConfig default: the merger's output = the text hidden size
        "mlp_ratio": 4,  # Qwen2VLVisionConfig default: MLP width 5120
        "num_heads": 16,  # Qwen2VLVisionConfig default
        "hidden_act": "quick_gelu",  # Qwen2VLVisionConfig default
        "patch_size": 14,  # config.json vision_config spatial_patch_size
        "spatial_merge_size": 2,  # Qwen2VLVisionConfig default
        "temporal_patch_size": 2,  # Qwen2VLVisionConfig default
    },
)

SHAPES = {shape.name: shape for shape in (QWEN2_5_VL_7B, QWEN2_5_VL_72B, QWEN2_VL_7B)}


def reduced(shape: ModelShape, layers: int | None = None, vision_blocks: int | None = None) -> ModelShape:
    """`shape` with fewer LLM layers and vision blocks, every width unchanged.

    A reduced Qwen2.5-VL tower keeps the real blocks' kinds in order: windowed attention, with full
    attention at the real full-attention indexes that survive, and at least its last block full (4 blocks:
    three windowed, block 3 full).

    Raises:
        ValueError: a depth below 1 or above the real one.
    """
    layers = shape.num_layers if layers is None else layers
    vision_blocks = shape.vision_depth if vision_blocks is None else vision_blocks
    for what, value, real in (("layers", layers, shape.num_layers), ("vision blocks", vision_blocks,
                              shape.vision_depth)):  # fmt: skip
        if not 1 <= value <= real:
            raise ValueError(f"{shape.name}: {what} must be between 1 and {real}, got {value}")
    text = {**shape.text, "num_hidden_layers": layers, "max_window_layers": layers}
    vision = {**shape.vision, "depth": vision_blocks}
    if "fullatt_block_indexes" in vision:
        kept = [i for i in vision["fullatt_block_indexes"] if i < vision_blocks]
        vision["fullatt_block_indexes"] = kept or [vision_blocks - 1]
    return ModelShape(shape.name, shape.family, shape.model_id, shape.source, text, vision)
