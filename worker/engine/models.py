"""Loading a Qwen2.5-VL / Qwen2-VL checkpoint: the model, its tokenizer and what preprocessing needs from it.

One `load_model` call per worker process; everything downstream takes the `LoadedModel` it returns.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.utils.hub import cached_file, extract_commit_hash, resolve_revision

from worker.engine.checkpoint_settings import evidence_config, read_checkpoint_settings
from worker.engine.evidence import EvidenceConfig

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-VL-7B-Instruct"

MODEL_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}

# OpenAI CLIP's normalisation, which every Qwen2-VL / Qwen2.5-VL preprocessor_config.json uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed at each end of a weight file


@dataclass(frozen=True)
class VisionSpec:
    """What frame preprocessing needs from the checkpoint.

    Args:
        patch_size (int): side of a square ViT patch in pixels (14).
        temporal_patch_size (int): frames per patch along time (2).
        merge_size (int): side of the square of patches merged into one LLM token (2).
        image_mean (tuple[float, float, float]): per-channel mean of pixels scaled to [0, 1].
        image_std (tuple[float, float, float]): per-channel std of pixels scaled to [0, 1].
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass
class LoadedModel:
    """A loaded checkpoint and the facts about it the engine needs.

    Args:
        model: the model, in eval mode, on `device` in `dtype`.
        tokenizer (PreTrainedTokenizerBase): the checkpoint's tokenizer, with a chat template.
        family (str): "qwen2_5_vl" or "qwen2_vl" (config.model_type).
        name (str): the path or hub model id it was loaded from, as given.
        revision (str): identifies the exact weights: the commit hash when loaded through the hub cache,
            else "local-" + a fingerprint of the folder (see `checkpoint_fingerprint`).
        vision (VisionSpec): patching and normalisation for frame preprocessing.
        device (torch.device): where the model's parameters are.
        dtype (torch.dtype): the model's parameter dtype.
        video_token_id (int): <|video_pad|>, one per merged video patch in the prompt.
        vision_start_token_id (int): <|vision_start|>.
        vision_end_token_id (int): <|vision_end|>.
        eos_token_ids (tuple[int, ...]): ids that end generation (<|im_end|> and <|endoftext|>).
        evidence (EvidenceConfig): which attention makes an answer's evidence: what `videoqa
            calibrate-evidence` wrote to the checkpoint's `videoqa.json`, else the question's prefill over
            every head.
    """

    model: Qwen2_5_VLForConditionalGeneration | Qwen2VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    family: str
    name: str
    revision: str
    vision: VisionSpec
    device: torch.device
    dtype: torch.dtype
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    evidence: EvidenceConfig = EvidenceConfig()


def load_model(
    name_or_path: str = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
) -> LoadedModel:
    """Load a Qwen2.5-VL or Qwen2-VL checkpoint from a local folder or the Hugging Face hub (and its cache).

    Args:
        name_or_path (str): a local checkpoint folder or a hub model id.
        dtype (str | torch.dtype): "auto" (bfloat16 on CUDA, float32 on CPU), a torch dtype or its name.
        device (str): "auto" (cuda if available, else cpu) or a torch device string such as "cuda:1".
        attn_implementation (str): transformers attention backend ("sdpa", "eager", "flash_attention_2", ...).
        revision (str | None): hub branch, tag or commit; ignored for local folders.

    Raises:
        FileNotFoundError: no such local folder, and (for a model id) nothing on the hub or in its cache.
        ValueError: the checkpoint is not a Qwen2.5-VL / Qwen2-VL one, or its tokenizer and config disagree.
    """
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch_dtype = _resolve_dtype(dtype, target)
    source = _resolve_source(name_or_path)
    # Pin a moving hub revision (a branch) to its commit, so that config, weights and tokenizer come from
    # the same repository state; local folders come back unchanged.
    revision = resolve_revision(source, revision)
    config_file = _find_file(source, "config.json", revision, required=True)

    config = AutoConfig.from_pretrained(source, revision=revision)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(
            f"unsupported model type {config.model_type!r} in {name_or_path!r}: "
            f"expected one of {sorted(MODEL_CLASSES)}"
        )
    # Loaded on the CPU then moved: transformers 5.24 wants `accelerate` for any device_map, even one
    # device, and the worker does not need accelerate otherwise.
    model = MODEL_CLASSES[config.model_type].from_pretrained(
        source, config=config, revision=revision, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    model = model.to(target).eval()

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _processor_chat_template(source, revision)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"no chat template in {name_or_path!r}: neither its tokenizer nor its processor has one"
        )
    _check_token_ids(tokenizer, config, name_or_path)

    commit = extract_commit_hash(config_file, None)
    return _loaded(
        model,
        tokenizer,
        name_or_path,
        commit or "local-" + checkpoint_fingerprint(Path(config_file).parent),
        _vision_spec(config, _find_file(source, "preprocessor_config.json", revision)),
    )


def wrap_model(model, tokenizer: PreTrainedTokenizerBase, name: str, revision: str) -> LoadedModel:
    """A `LoadedModel` around a model built in memory (random weights made on the device, never saved):
    what `load_model` returns, with CLIP normalisation and the vision tower's own patching."""
    if tokenizer.chat_template is None:
        raise ValueError(f"no chat template in the tokenizer of {name!r}")
    _check_token_ids(tokenizer, model.config, name)
    return _loaded(model.eval(), tokenizer, name, revision, _vision_spec(model.config, None))


def _loaded(model, tokenizer: PreTrainedTokenizerBase, name: str, revision: str, vision: VisionSpec):
    config = model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=config.model_type,
        name=name,
        revision=revision,
        vision=vision,
        device=model.device,
        dtype=model.dtype,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        eos_token_ids=_eos_token_ids(model, tokenizer),
        evidence=evidence_config(read_checkpoint_settings(name)),
    )


def checkpoint_fingerprint(folder: Path) -> str:
    """A cheap, deterministic fingerprint of a local checkpoint's weights: 16 hex digits.

    Hashes config.json in full and, for every weight file (*.safetensors, *.bin, *.pt, *.pth, sorted by
    name), its name, its size and its first and last MiB (a safetensors file starts with its header of
    tensor names, shapes and offsets). A 7B checkpoint costs a few MiB of reading, not 15 GB. Modification
    times are left out on purpose: a copied checkpoint keeps its fingerprint. Weights rewritten in place
    with the same size and the same first and last MiB would go unnoticed; retraining never does that.
    """
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_FINGERPRINT_SAMPLE))
            if size > _FINGERPRINT_SAMPLE:
                f.seek(max(size - _FINGERPRINT_SAMPLE, _FINGERPRINT_SAMPLE))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', or a torch dtype name such as 'bfloat16'")
    return resolved


def _resolve_source(name_or_path: str) -> str:
    """A local folder as an absolute path string, or a hub model id unchanged."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    # A hub id is "name" or "org/name"; anything else can only have meant a local folder.
    looks_like_path = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    if path.exists() or looks_like_path:
        raise FileNotFoundError(f"model {name_or_path!r} not found: {path.absolute()} is not a directory")
    return name_or_path


def _find_file(source: str, filename: str, revision: str | None, *, required: bool = False) -> str | None:
    """The local path of filename in a checkpoint folder or hub repo (downloaded into the hub cache)."""
    folder = Path(source)
    if folder.is_dir():
        if (folder / filename).is_file():
            return str(folder / filename)
        if required:
            raise FileNotFoundError(f"model {source!r} is not a checkpoint: it has no {filename}")
        return None
    try:
        return cached_file(
            source,
            filename,
            revision=revision,
            _raise_exceptions_for_missing_entries=required,
            _raise_exceptions_for_connection_errors=required,
        )
    except (OSError, ValueError) as error:  # hub errors: missing repo or file, no connection, bad repo id
        raise FileNotFoundError(
            f"model {source!r} not found: not a local directory, and no {filename} for it "
            f"on the Hugging Face hub or in its cache ({error})"
        ) from error


def _processor_chat_template(source: str, revision: str | None) -> str | None:
    """The processor's chat template: chat_template.jinja, or "chat_template" in chat_template.json."""
    jinja = _find_file(source, "chat_template.jinja", revision)
    if jinja is not None:
        return Path(jinja).read_text()
    as_json = _find_file(source, "chat_template.json", revision)
    if as_json is not None:
        return json.loads(Path(as_json).read_text()).get("chat_template")
    return None


def _check_token_ids(tokenizer: PreTrainedTokenizerBase, config, name: str) -> None:
    """Prompts are built from tokenizer ids, the model finds video tokens by config ids: they must agree."""
    expected = {
        "<|video_pad|>": config.video_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
    }
    for token, config_id in expected.items():
        tokenizer_id = tokenizer.convert_tokens_to_ids(token)
        if tokenizer_id != config_id:
            raise ValueError(f"{name!r}: tokenizer has {token} = {tokenizer_id}, config says {config_id}")


def _vision_spec(config, preprocessor_file: str | None) -> VisionSpec:
    """Patching from the vision tower's config; normalisation from preprocessor_config.json when present."""
    vision = config.vision_config
    spec = VisionSpec(
        patch_size=int(vision.patch_size),
        temporal_patch_size=int(vision.temporal_patch_size),
        merge_size=int(vision.spatial_merge_size),
    )
    if preprocessor_file is None:
        return spec
    preprocessor = json.loads(Path(preprocessor_file).read_text())
    for field in ("patch_size", "temporal_patch_size", "merge_size"):
        if field in preprocessor and preprocessor[field] != getattr(spec, field):
            raise ValueError(
                f"preprocessor_config.json has {field} = {preprocessor[field]}, "
                f"but the vision tower was built for {getattr(spec, field)}"
            )
    return VisionSpec(
        patch_size=spec.patch_size,
        temporal_patch_size=spec.temporal_patch_size,
        merge_size=spec.merge_size,
        image_mean=tuple(float(x) for x in preprocessor.get("image_mean", CLIP_MEAN)),
        image_std=tuple(float(x) for x in preprocessor.get("image_std", CLIP_STD)),
    )


def _eos_token_ids(model, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """generation_config's eos ids, then the text config's, then <|im_end|> and <|endoftext|>; no repeats."""
    candidates = []
    for eos in (model.generation_config.eos_token_id, model.config.get_text_config().eos_token_id):
        candidates.extend(eos if isinstance(eos, list | tuple) else [eos])
    for token in ("<|im_end|>", "<|endoftext|>"):
        if token in tokenizer.get_vocab():
            candidates.append(tokenizer.convert_tokens_to_ids(token))
    return tuple(dict.fromkeys(int(i) for i in candidates if i is not None))
