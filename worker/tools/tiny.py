"""Tiny random Qwen2.5-VL and Qwen2-VL checkpoints, built offline in seconds for tests and demos.

Each checkpoint is a real `save_pretrained` folder (safetensors weights, config, generation config,
tokenizer, chat template, preprocessor config) that `worker.engine.models.load_model` and `from_pretrained`
load like the real 7B ones. The architecture is the real one shrunk the way transformers' own model
tests do it; the tokenizer is a byte-level BPE trained here on a few built-in paragraphs, with Qwen's
special tokens appended after the BPE vocabulary in Qwen's order. Weights and tokenizer are
deterministic: the same out_dir contents on every build.

`make_shaped` writes the same kind of folder for a real architecture (`worker.tools.shapes`: Qwen2.5-VL-7B,
-72B, Qwen2-VL-7B) at a reduced depth: real widths and vocabulary, random bf16 weights, the tiny tokenizer.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.initialization import no_init_weights
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.utils import logging as hf_logging

from worker.tools.shapes import ModelShape

SEED = 0
BPE_VOCAB_SIZE = 1000  # an upper bound: the built-in corpus runs out of merges a little below it
POOL_SIZE = 16_777_213  # the largest prime below 2**24: random normals shared by a real shape's weights

# Qwen's special tokens in Qwen's id order (real ids 151643..151656 follow the 151643 BPE tokens).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template shipped by Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json (CLIP mean/std, 14-pixel patches, 2x2 merge).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}

_PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}
_MODEL_CLASS = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}

# The text model of both families: GQA (4 query heads share 2 kv heads), head_dim 64 / 4 = 16, and an
# mrope_section of (temporal, height, width) rotary pairs summing to head_dim / 2 like the real [16, 24, 24].
TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 4,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}

VISION_CONFIG = {
    # Qwen2.5-VL: window attention everywhere but the blocks in fullatt_block_indexes, as in the 7B.
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "hidden_act": "silu",
        "out_hidden_size": TEXT_CONFIG["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    },
    # Qwen2-VL names the tower width embed_dim and the merger's output width hidden_size.
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": TEXT_CONFIG["hidden_size"],
        "mlp_ratio": 4,
        "num_heads": 2,
        "hidden_act": "quick_gelu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

_CORPUS = """\
A woman walks into the kitchen, opens the fridge and takes out a carton of milk. She pours the milk
into a glass, puts the carton back and closes the door. Then she sits at the table by the window and
reads the newspaper while the cat sleeps on the chair next to her.

The video begins with a wide shot of a city street at night. Cars drive past, their lights leaving
long red and white trails. A man in a blue jacket crosses the road, looks at his phone and turns
left at the corner. The camera follows him to a small shop where he buys bread, coffee and apples.

In the second part of the video, two children play football in a park. The boy in the red shirt
kicks the ball over the fence, and the girl runs to get it back. Their father watches from a bench
and laughs. Later they all walk home together as the sun goes down behind the trees.

Question: What does the man buy at the shop? Answer with the letter of the correct option.
A. Bread, coffee and apples. B. Milk and eggs. C. A newspaper. D. Nothing at all.
The answer is A. The man buys bread, coffee and apples before he walks home.

A chef cuts onions, carrots and potatoes on a wooden board, then drops them into a large pot of
boiling water. She adds salt, pepper and a little oil, stirs the soup with a long spoon and covers
the pot. After twenty minutes she tastes the soup, smiles and serves it in white bowls.

The lecture video shows a teacher writing numbers on the board: 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10.
She explains how to add and subtract them, then asks the students a question. One student raises
his hand and answers correctly. The class ends at 10:45 when the bell rings.

Please describe the video in detail. What happens first, what happens next, and how does it end?
Who is in the video, where are they, and what are they doing? How many people can you see?
"""


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE like Qwen2's, trained on the built-in corpus, with Qwen's special tokens added."""
    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    model = json.loads(backend.to_str())["model"]

    # Qwen2Tokenizer rebuilds the same BPE pipeline from vocab + merges; it adds <|endoftext|> (its
    # unk/eos/pad token) first, and the other special tokens follow in SPECIAL_TOKENS order.
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"  # as in the Instruct checkpoints' tokenizer_config.json
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    text: dict | None = None,
    vision: dict | None = None,
) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """The tiny config of one family ("qwen2_5_vl" or "qwen2_vl"), its token ids taken from tokenizer.

    Args:
        text (dict | None): entries that replace TEXT_CONFIG's (e.g. a wider or deeper model) and the
            tokenizer's vocabulary size (a real shape's 152 064 rows).
        vision (dict | None): entries that replace the family's VISION_CONFIG entries.
    """
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),  # the tiny models' own; a real shape brings its 152 064
        **TEXT_CONFIG,
        **(text or {}),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config_class = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen2_vl": Qwen2VLConfig}[family]
    return config_class(
        text_config=text_config,
        vision_config={**VISION_CONFIG[family], **(vision or {})},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    config: Qwen2_5_VLConfig | Qwen2VLConfig | None = None,
    seed: int = SEED,
) -> Qwen2_5_VLForConditionalGeneration | Qwen2VLForConditionalGeneration:
    """The model of one family with deterministic random weights (seeded init), in eval mode.

    Args:
        config: defaults to `tiny_config(family, tokenizer)`.
    """
    config = config or tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASS[family](config)
    return _with_generation_config(model, tokenizer).eval()


def _with_generation_config(model, tokenizer: PreTrainedTokenizerBase):
    eos, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # The real generation_config.json lists both ends of turn; greedy so that tiny outputs are reproducible.
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=[im_end, eos], pad_token_id=eos, do_sample=False
    )
    return model


def shaped_config(shape: ModelShape, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """The config of a real architecture (`worker.tools.shapes`), its token ids taken from tokenizer."""
    return tiny_config(shape.family, tokenizer, shape.text, shape.vision)


def build_shaped_model(
    shape: ModelShape,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VLForConditionalGeneration | Qwen2VLForConditionalGeneration:
    """A model of `shape`'s real widths (at its possibly reduced depth) with seeded random weights, made
    directly in bf16 on `device` (an fp32 copy of 72B widths would not fit), in eval mode.

    The weights follow transformers' init distribution (matrices N(0, initializer_range), biases 0, norm
    scales 1), but drawing a fresh normal for each of a 7B shape's 1.7 billion parameters at 2 layers
    takes minutes on a CPU: each matrix is instead a window of one seeded pool of POOL_SIZE normals, read
    from its own random offset and wrapping around. A prime pool length keeps rows (and heads) apart.
    """
    config = shaped_config(shape, tokenizer)
    with torch.device(device), no_init_weights():
        model = _MODEL_CLASS[config.model_type]._from_config(
            config, dtype=torch.bfloat16, attn_implementation=attn_implementation
        )
    generator = torch.Generator().manual_seed(SEED)
    std = config.get_text_config().initializer_range
    pool = (torch.randn(POOL_SIZE, generator=generator) * std).to(device, torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            offset = int(torch.randint(POOL_SIZE, (1,), generator=generator))
            window = torch.cat([pool[offset:], pool[:offset]])
            flat = param.view(-1)
            for start in range(0, flat.numel(), POOL_SIZE):
                flat[start : start + POOL_SIZE] = window[: flat.numel() - start]
    return _with_generation_config(model, tokenizer).eval()


def make_tiny(out_dir: Path | str) -> dict[str, Path]:
    """Write tiny random checkpoints of both families under out_dir; prints nothing.

    Args:
        out_dir (Path | str): created if missing; gets the folders "qwen2_5_vl" and "qwen2_vl".

    Returns:
        dict[str, Path]: family -> checkpoint folder, for `load_model(path)`.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    paths = {}
    for family in ("qwen2_5_vl", "qwen2_vl"):
        paths[family] = save_checkpoint(build_tiny_model(family, tokenizer), tokenizer, out_dir / family)
    return paths


def make_shaped(out_dir: Path | str, shape: ModelShape) -> Path:
    """Write a random checkpoint of `shape` (see `worker.tools.shapes.reduced` for fewer layers) into out_dir,
    with the tiny tokenizer; prints nothing. A 7B shape at 2 layers is about 3.4 GB of bf16 weights.

    Returns:
        Path: out_dir, for `load_model(path)`.
    """
    tokenizer = build_tokenizer()
    return save_checkpoint(build_shaped_model(shape, tokenizer), tokenizer, Path(out_dir))


def save_checkpoint(model, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """Write `model` and `tokenizer` as a checkpoint folder laid out like the real ones; prints nothing."""
    with _no_progress_bars():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    preprocessor = {**PREPROCESSOR_CONFIG, "processor_class": _PROCESSOR_CLASS[model.config.model_type]}
    _write_json(path / "preprocessor_config.json", preprocessor)
    # The real checkpoints carry the template for the processor too; load_model falls back to it.
    _write_json(path / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return path


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """save_pretrained draws a "Writing model shards" bar on stderr; make_tiny must print nothing."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
