"""`videoqa calibrate-evidence` on the committed needle checkpoint: it repeats from its seed, and what it
writes is what the model then loads."""

import shutil
from pathlib import Path

from worker.engine.adaretake import CompressionConfig
from worker.engine.checkpoint_settings import read_checkpoint_settings, with_settings
from worker.engine.evidence import EvidenceConfig
from worker.engine.models import load_model
from worker.needle.calibrate import CalibrationConfig, calibrate
from worker.tools.cli import main

CHECKPOINT = Path(__file__).resolve().parents[3] / "models" / "needle" / "qwen2_5_vl"
SMALL = CalibrationConfig(videos=3, seed=5, seconds=12.0, shares=(0.1, 1.0))


def test_calibration_repeats_from_its_seed():
    loaded = load_model(str(CHECKPOINT), device="cpu", dtype="float32")
    base = with_settings(CompressionConfig(chunk_frames=8), read_checkpoint_settings(CHECKPOINT))
    first, again = calibrate(loaded, base, SMALL), calibrate(loaded, base, SMALL)
    assert first.settings() == again.settings()
    assert first.cases == 6
    text = loaded.model.config.get_text_config()
    assert len(first.hits) == text.num_hidden_layers and len(first.hits[0]) == text.num_attention_heads
    # A set smaller than every head stands only where it did better on the videos it was not chosen on.
    held_out = first.grounded
    assert bool(first.heads) == (
        held_out["chosen heads, held-out half"] > held_out["every head, held-out half"]
    )
    other = calibrate(loaded, base, CalibrationConfig(videos=3, seed=6, seconds=12.0, shares=(0.1, 1.0)))
    assert other.hits != first.hits  # other videos


def test_the_command_writes_what_the_model_then_loads(tmp_path, capsys):
    folder = tmp_path / "qwen2_5_vl"
    shutil.copytree(CHECKPOINT, folder)
    args = ["calibrate-evidence", "--model", str(folder), "--videos", "2", "--shares", "0.1", "--seed", "1",
            "--chunk-frames", "8"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "heads (layer.head):" in out and "written to" in out
    evidence = read_checkpoint_settings(folder)["evidence"]
    assert evidence["calibration"]["seed"] == 1 and evidence["calibration"]["cases"] == 2
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    assert loaded.evidence == EvidenceConfig(heads=tuple(tuple(pair) for pair in evidence["heads"]))
