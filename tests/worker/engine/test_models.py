"""worker.engine.models and worker.tools.tiny: loading checkpoints, the tiny offline ones, the contract."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from worker.engine.models import (
    CLIP_MEAN,
    CLIP_STD,
    LoadedModel,
    VisionSpec,
    checkpoint_fingerprint,
    load_model,
)
from worker.tools.tiny import (
    SPECIAL_TOKENS,
    TEXT_CONFIG,
    VISION_CONFIG,
    build_tiny_model,
    build_tokenizer,
    make_tiny,
)

FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@pytest.fixture(scope="module")
def loaded(tiny_models) -> dict[str, LoadedModel]:
    return {family: load_model(str(tiny_models[family])) for family in FAMILIES}


def _saved_to_loaded_name(name: str) -> str:
    """transformers 5 saves Qwen-VL weights under their original checkpoint names and renames them on load."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name.removeprefix("model.")
    return name


def _video_prompt_ids(lm: LoadedModel, grid_thw: tuple[int, int, int], prefix: int = 3, suffix: int = 3):
    """[1, N] ids (text, <|vision_start|>, t*h*w/4 video pads, <|vision_end|>, text) and their token types."""
    n_video = grid_thw[0] * grid_thw[1] * grid_thw[2] // lm.vision.merge_size**2
    text = lm.tokenizer("the man", add_special_tokens=False).input_ids[:1]
    ids = (
        text * prefix
        + [lm.vision_start_token_id]
        + [lm.video_token_id] * n_video
        + [lm.vision_end_token_id]
        + text * suffix
    )
    input_ids = torch.tensor([ids])  # [1, N]
    mm_token_type_ids = (input_ids == lm.video_token_id).int() * 2  # text 0, image 1, video 2
    return input_ids, mm_token_type_ids


# --- make_tiny and load_model ---------------------------------------------------------------------------


def test_make_tiny_writes_loadable_checkpoints(tiny_models):
    assert set(tiny_models) == set(FAMILIES)
    for family, path in tiny_models.items():
        assert path.name == family
        for name in (
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
            "chat_template.json",
        ):
            assert (path / name).is_file(), f"{family}: {name} missing"


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_round_trips_the_tiny_checkpoint(loaded, tiny_models, family):
    lm = loaded[family]
    assert lm.family == family
    assert lm.name == str(tiny_models[family])
    expected_class = {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
    }
    assert type(lm.model).__name__ == expected_class[family]
    assert not lm.model.training
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32  # "auto" on a CPU-only machine
    assert lm.model.config._attn_implementation == "sdpa"

    saved = load_file(tiny_models[family] / "model.safetensors")
    state = lm.model.state_dict()
    assert {_saved_to_loaded_name(name) for name in saved} == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[_saved_to_loaded_name(name)], tensor), name
    # and what was saved is what build_tiny_model built
    built = build_tiny_model(family, build_tokenizer()).state_dict()
    assert all(torch.equal(built[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_is_as_built(loaded, family):
    config = loaded[family].model.config
    text, vision = config.text_config, config.vision_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(text, key) == TEXT_CONFIG[key], key
    assert text.num_key_value_heads == 2 < text.num_attention_heads  # grouped-query attention
    assert text.vocab_size == len(loaded[family].tokenizer)
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 16 and sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert not config.tie_word_embeddings
    for key, value in VISION_CONFIG[family].items():
        assert getattr(vision, key) == value, key
    if family == "qwen2_5_vl":
        assert vision.out_hidden_size == text.hidden_size
        assert (vision.window_size, vision.fullatt_block_indexes, vision.tokens_per_second) == (112, [1], 2)
    else:
        assert vision.hidden_size == text.hidden_size  # Qwen2-VL's merger output width
    assert loaded[family].vision == VisionSpec(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_are_single_ids_matching_the_config(loaded, family):
    lm = loaded[family]
    tokenizer, config = lm.tokenizer, lm.model.config
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    # appended after the BPE vocabulary, in Qwen's order, like the real 151643..151656
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[-1] == len(tokenizer) - 1
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id], token
        assert tokenizer(f"hello{token}world", add_special_tokens=False).input_ids.count(token_id) == 1
    prompt = "<|vision_start|><|video_pad|><|vision_end|>hello"
    encoded = tokenizer(prompt, add_special_tokens=False).input_ids
    assert encoded[:3] == [config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]
    assert tokenizer.decode(encoded) == prompt
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (lm.video_token_id, lm.vision_start_token_id, lm.vision_end_token_id) == (
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    )
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert lm.eos_token_ids == (im_end, endoftext)
    assert config.text_config.eos_token_id == im_end and config.text_config.bos_token_id == endoftext
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None  # Qwen adds no BOS
    assert tokenizer("hi").input_ids == tokenizer("hi", add_special_tokens=False).input_ids


def test_chat_template_renders_the_qwen_prompt(loaded):
    tokenizer = loaded["qwen2_5_vl"].tokenizer
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    video_question = [{"role": "user", "content": content}]
    assert tokenizer.apply_chat_template(video_question, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    ]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
    )


def test_chat_template_falls_back_to_the_processor_one(tiny_models, tmp_path, loaded):
    """Checkpoints whose template is only in the processor's chat_template.json still get one."""
    path = shutil.copytree(tiny_models["qwen2_vl"], tmp_path / "no_tokenizer_template")
    (path / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert transformers.AutoTokenizer.from_pretrained(path).chat_template is None
    assert load_model(str(path)).tokenizer.chat_template == loaded["qwen2_vl"].tokenizer.chat_template

    (path / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_model(str(path))


def test_make_tiny_is_deterministic_and_quiet(tiny_models, tmp_path, capfd):
    again = make_tiny(tmp_path)
    assert capfd.readouterr() == ("", "")
    for family in FAMILIES:
        first = sorted(p.name for p in tiny_models[family].iterdir())
        assert first == sorted(p.name for p in again[family].iterdir())
        for name in first:
            assert (tiny_models[family] / name).read_bytes() == (again[family] / name).read_bytes(), name


def test_revision_is_a_content_fingerprint(loaded, tiny_models, tmp_path):
    revisions = {family: loaded[family].revision for family in FAMILIES}
    for family, revision in revisions.items():
        assert re.fullmatch(r"local-[0-9a-f]{16}", revision)
        assert revision == "local-" + checkpoint_fingerprint(tiny_models[family])
    assert revisions["qwen2_5_vl"] != revisions["qwen2_vl"]

    copy = shutil.copytree(tiny_models["qwen2_vl"], tmp_path / "copy")  # new mtimes, same bytes
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_models["qwen2_vl"])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tiny_models["qwen2_vl"])


def test_load_model_on_a_missing_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(str(missing))


def test_load_model_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model type 'gpt2'.*qwen2_5_vl"):
        load_model(str(tmp_path))


def test_load_model_dtype(tiny_models):
    assert load_model(str(tiny_models["qwen2_vl"]), dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(str(tiny_models["qwen2_vl"]), dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        load_model(str(tiny_models["qwen2_vl"]), dtype="float99")


def test_load_model_rejects_a_preprocessor_that_does_not_fit_the_tower(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models["qwen2_5_vl"], tmp_path / "bad_preprocessor")
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size = 16"):
        load_model(str(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_text_gives_logits_over_the_vocabulary(loaded, family):
    lm = loaded[family]
    input_ids = lm.tokenizer("What does the man buy?", return_tensors="pt").input_ids  # [1, N]
    with torch.no_grad():
        logits = lm.model(input_ids=input_ids).logits  # [1, N, vocab]
    assert logits.shape == (1, input_ids.shape[1], len(lm.tokenizer))
    assert torch.isfinite(logits).all()


# --- CONTRACT: the transformers internals the engine relies on. A failure here after an upgrade means the
# --- engine code must be re-checked against the new internals before the pin moves.


def test_contract_transformers_version():
    assert transformers.__version__ == "5.24.0"


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_module_layout(loaded, family):
    model = loaded[family].model
    text = model.config.text_config
    language_model = model.model.language_model
    assert isinstance(model.model.visual, torch.nn.Module)
    assert model.model.visual.spatial_merge_size == 2
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.out_features == text.vocab_size
    assert len(language_model.layers) == text.num_hidden_layers
    for layer_idx, layer in enumerate(language_model.layers):
        attention = layer.self_attn
        assert attention.layer_idx == layer_idx
        assert (attention.head_dim, attention.num_key_value_groups) == (16, 2)
    assert isinstance(language_model.embed_tokens, torch.nn.Embedding)
    assert isinstance(language_model.norm, torch.nn.Module)


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_get_rope_index(loaded, family):
    lm = loaded[family]
    grid_thw = (6, 4, 4)  # 6 temporal patches of 2x2 merged tokens
    input_ids, mm_token_type_ids = _video_prompt_ids(lm, grid_thw)
    kwargs = {"video_grid_thw": torch.tensor([grid_thw])}
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([1.0])  # 2 frames at 2 fps -> 1 s per temporal patch
    get_rope_index = lm.model.model.get_rope_index
    position_ids, deltas = get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs)

    n = input_ids.shape[1]
    assert position_ids.shape == (3, 1, n) and position_ids.dtype == torch.long
    assert deltas.shape == (1, 1) and deltas.item() == position_ids.max().item() + 1 - n
    video = position_ids[:, 0, 4:28]  # [3, 24]: the video pads, after 3 text tokens and <|vision_start|>
    start = 4
    tokens_per_temporal_patch = 2 if family == "qwen2_5_vl" else 1  # tokens_per_second * 1 s, or 1
    temporal = start + tokens_per_temporal_patch * torch.arange(6).repeat_interleave(4)
    assert torch.equal(video[0], temporal)
    assert torch.equal(video[1], start + torch.tensor([0, 0, 1, 1]).repeat(6))
    assert torch.equal(video[2], start + torch.tensor([0, 1, 0, 1]).repeat(6))
    assert torch.equal(position_ids[:, 0, :4], torch.arange(4).expand(3, 4))
    # 5.24 starts the text after a video at start + max(h, w) / merge, NOT at the video's max position + 1 as
    # Qwen's reference code (and transformers <= 5.2) does, so it overlaps the temporal positions of a long
    # video while `deltas` still uses the max. The engine builds its own positions; re-check on upgrade.
    after = position_ids[:, 0, 28:]  # <|vision_end|> and 3 text tokens
    assert torch.equal(after, (start + 2 + torch.arange(4)).expand(3, 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_language_model_with_cache(loaded, family):
    lm = loaded[family]
    language_model = lm.model.model.language_model
    text = lm.model.config.text_config
    n = 7
    input_ids = torch.arange(10, 10 + n)[None]  # [1, N]
    inputs_embeds = language_model.embed_tokens(input_ids)  # [1, N, hidden]
    position_ids = torch.arange(n).view(1, 1, n).expand(3, 1, n)  # [3, 1, N]: text-only mrope
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad():
        out = language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache, use_cache=True
        )
    assert out.last_hidden_state.shape == (1, n, text.hidden_size)
    assert out.cache is cache and len(cache.layers) == text.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (1, 2, n, 16)  # [batch, kv_heads, seq, head_dim]

    # Dropping tokens from each layer by reassigning keys/values (what compression does) is honoured.
    keep = torch.tensor([0, 2, 3, 6])
    for layer_idx, layer in enumerate(cache.layers):
        kept = keep[: len(keep) - layer_idx % 2]  # per-layer lengths may differ
        layer.keys = layer.keys[:, :, kept]
        layer.values = layer.values[:, :, kept]
    assert cache.get_seq_length(0) == 4 and cache.get_seq_length(1) == 3
    step_embeds = language_model.embed_tokens(torch.tensor([[42]]))  # [1, 1, hidden]
    step_positions = torch.full((3, 1, 1), n)  # [3, 1, 1]
    with torch.no_grad():
        language_model(inputs_embeds=step_embeds, position_ids=step_positions, cache=cache, use_cache=True)
    assert [layer.keys.shape[2] for layer in cache.layers] == [5, 4, 5, 4]

    logits = lm.model.lm_head(out.last_hidden_state)  # [1, N, vocab]
    assert logits.shape == (1, n, text.vocab_size)


def test_contract_attention_and_mask_interfaces(tiny_models, loaded):
    """A registered attention function sees post-RoPE queries/keys and the layer, with its named mask."""
    name = "videoqa_contract_probe"
    calls = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "layer_idx"):  # text layers; the vision tower's attention has no layer_idx
            calls.append((module.layer_idx, query.shape, key.shape, attention_mask))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, probe)
    AttentionMaskInterface.register(name, eager_mask)
    probed = load_model(str(tiny_models["qwen2_5_vl"]), attn_implementation=name)
    assert probed.model.config._attn_implementation == name

    input_ids = torch.arange(10, 16)[None]  # [1, 6]
    with torch.no_grad():
        logits = probed.model(input_ids=input_ids).logits
        reference = loaded["qwen2_5_vl"].model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, reference)
    assert [layer_idx for layer_idx, *_ in calls] == [0, 1, 2, 3]
    for _, query_shape, key_shape, mask in calls:
        assert query_shape == (1, 4, 6, 16) and key_shape == (1, 2, 6, 16)
        assert mask is not None and mask.shape == (1, 1, 6, 6)
        allowed = mask == 0 if mask.dtype.is_floating_point else mask
        assert torch.equal(allowed[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
