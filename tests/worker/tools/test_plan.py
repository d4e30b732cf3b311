"""worker.tools.plan: the memory and size model, its parameter counts, and `videoqa plan`."""

import json
import re
from pathlib import Path

import pytest

from service.contract import Settings
from worker.engine.adaretake import CompressionConfig
from worker.engine.vision import VISION_SLICE_GRIDS
from worker.tools.cli import main
from worker.tools.plan import Workload, parameters, plan, shape_from_config, sizing_table
from worker.tools.shapes import SHAPES, ModelShape, reduced
from worker.tools.tiny import TEXT_CONFIG, VISION_CONFIG, build_tiny_model, build_tokenizer

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_parameter_count_is_transformers_own(family):
    tokenizer = build_tokenizer()
    shape = ModelShape("tiny", family, "tiny", "worker/tools/tiny.py",
                       {**TEXT_CONFIG, "vocab_size": len(tokenizer)}, VISION_CONFIG[family])  # fmt: skip
    assert parameters(shape) == build_tiny_model(family, tokenizer).num_parameters()


def test_token_arithmetic_of_the_paper_setting():
    p = plan(SHAPES["7b"], Workload(duration=3 * 3600.0))
    assert p.frames == 2048 and p.frame_size == (448, 252)  # the 2048-frame cap at 2 fps
    assert p.video_tokens == 147_456 and p.chunk_tokens == 2304  # ADARETAKE.md section 1
    assert p.kept_tokens == 16_000 and p.kv_bytes_per_token == 57_344
    # The artifact: 16 000 tokens x 28 layers x (2048 bytes of K/V + a 4-byte frame index) + frame times.
    assert p.artifact_bytes - 16 * 1024 == 16_000 * 28 * 2052 + 2048 * 8
    short = plan(SHAPES["7b"], Workload(duration=60.0))
    assert short.frames == 120 and short.video_tokens == 60 * 144 and short.kept_tokens == 15 + 8640


def test_memory_grows_with_depth_by_weights_and_cache_per_layer():
    work = Workload(duration=600.0)
    one, two = (plan(reduced(SHAPES["7b"], layers), work) for layers in (1, 2))
    assert two.weights - one.weights == one.weights_per_layer
    per_layer_cache = one.prefill_cache  # one layer's cache at the last chunk
    assert two.prefill_cache == 2 * per_layer_cache
    assert two.peak - one.peak == one.weights_per_layer + per_layer_cache


def test_the_reference_variant_is_planned_over_budget():
    paper = plan(SHAPES["7b"], Workload(duration=600.0))
    reference = plan(SHAPES["7b"], Workload(duration=600.0, temporal_allocation="reference"))
    assert reference.kept_tokens - 15 == 2 * (paper.kept_tokens - 15)


def test_workload_defaults_are_the_engine_defaults():
    engine, work = CompressionConfig(), Workload(duration=1.0)
    assert (work.sampling, work.budget, work.chunk_frames, work.temporal_allocation) == (
        engine.sampling, engine.budget, engine.chunk_frames, engine.temporal_allocation)  # fmt: skip
    assert work.vision_slice_grids == VISION_SLICE_GRIDS


def test_readme_has_the_current_sizing_table():
    fields = Settings.model_fields
    table = sizing_table(
        [SHAPES["7b"], SHAPES["72b"]],
        fields["memory_cache_bytes"].default,
        fields["disk_cache_bytes"].default,
    )
    assert table in README.read_text(), "regenerate it: videoqa plan --table"


def test_shape_from_a_checkpoint_config(tiny_models, tmp_path):
    shape = shape_from_config(tiny_models["qwen2_5_vl"])
    assert shape.family == "qwen2_5_vl" and shape.text["hidden_size"] == TEXT_CONFIG["hidden_size"]
    assert shape.vision["depth"] == VISION_CONFIG["qwen2_5_vl"]["depth"]
    # transformers 4.x wrote the text fields at the top level and left vision defaults out.
    flat = {"model_type": "qwen2_vl", **SHAPES["qwen2-7b"].text, "vision_config": {"in_chans": 3}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    old = shape_from_config(tmp_path)
    assert parameters(old) == parameters(SHAPES["qwen2-7b"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not qwen2_5_vl or qwen2_vl"):
        shape_from_config(tmp_path)
    with pytest.raises(ValueError, match="cannot read a model config"):
        shape_from_config(tmp_path / "missing")


def test_videoqa_plan(capsys, tiny_models):
    assert main(["plan", "--shape", "72b", "--duration", "3600"]) == 0
    out = capsys.readouterr().out
    assert "frames 2048 at 448x252" in out and "327680 bytes" in out
    assert re.search(r"peak memory\s+\d+\.\d\d GiB \(prefill\)", out)
    assert main(["plan", "--model", str(tiny_models["qwen2_vl"]), "--duration", "20"]) == 0
    assert "qwen2_vl, 4 layers" in capsys.readouterr().out
    assert main(["plan", "--table"]) == 0
    assert "| Qwen2.5-VL-72B-Instruct | 3 h | 2048 |" in capsys.readouterr().out


def test_videoqa_plan_and_make_tiny_refuse_nonsense(capsys, tmp_path):
    assert main(["plan", "--layers", "0"]) == 2
    assert "layers must be between 1 and 28" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path), "--layers", "2"]) == 2
    assert "apply to a real shape" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
