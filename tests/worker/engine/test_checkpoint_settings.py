"""A checkpoint's videoqa.json: the CLI's and the worker's defaults, explicit flags and presets winning."""

import json

import pytest

from service.contract import Settings
from worker.engine.adaretake import PRESETS, CompressionConfig
from worker.engine.checkpoint_settings import (
    SETTINGS_FILE,
    evidence_config,
    read_checkpoint_settings,
    with_settings,
    write_evidence,
)
from worker.engine.evidence import EvidenceConfig
from worker.serving.runtime import compression_config
from worker.tools.cli import _compression_config, build_parser

CARRIED = {"sampling": {"fps": 1.0, "long_side": 112}, "guide_prompt": "Describe every shape.", "budget": 900}


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(CARRIED))
    return tmp_path


def test_settings_apply_over_the_defaults(checkpoint):
    config = with_settings(CompressionConfig(), read_checkpoint_settings(checkpoint))
    assert (config.sampling.fps, config.sampling.long_side, config.sampling.max_frames) == (1.0, 112, 2048)
    assert config.guide_prompt == "Describe every shape." and config.budget == 900
    assert config.chunk_frames == CompressionConfig().chunk_frames


def test_no_file_or_a_hub_id_carries_nothing(tmp_path):
    assert read_checkpoint_settings(tmp_path) == {}
    assert read_checkpoint_settings("Qwen/Qwen2.5-VL-7B-Instruct") == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"fsp": 2}', "unknown settings: fsp"),
        ('{"sampling": {"fps": 2, "width": 3}}', "unknown settings: sampling.width"),
        ('{"evidence": {"heads": [[0, 1]], "layers": [2]}}', "unknown evidence settings: layers"),
        ('{"evidence": {"aggregate": "mean"}}', "evidence aggregate must be one of"),
    ],
)
def test_a_bad_file_is_a_clear_error(tmp_path, content, message):
    (tmp_path / SETTINGS_FILE).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_checkpoint_settings(tmp_path)


def test_a_bad_value_fails_like_a_bad_flag(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text('{"sampling": {"fps": -1}}')
    with pytest.raises(ValueError, match="fps must be positive"):
        with_settings(CompressionConfig(), read_checkpoint_settings(tmp_path))


def test_cli_flags_win_over_the_checkpoint(checkpoint):
    parse = build_parser().parse_args
    carried = _compression_config(parse(["ask", "v.mp4", "q", "--model", str(checkpoint)]))
    assert (carried.sampling.fps, carried.budget) == (1.0, 900)
    given = _compression_config(
        parse(["ask", "v.mp4", "q", "--model", str(checkpoint), "--fps", "2", "--budget", "64"])
    )
    assert (given.sampling.fps, given.sampling.long_side, given.budget) == (2.0, 112, 64)


def test_the_worker_uses_the_checkpoint_unless_a_preset_is_set(checkpoint, monkeypatch):
    monkeypatch.delenv("VIDEOQA_PRESET", raising=False)
    carried = compression_config(Settings(model=str(checkpoint)))
    assert (carried.sampling.fps, carried.guide_prompt) == (1.0, "Describe every shape.")
    assert compression_config(Settings(model=str(checkpoint), preset="tiny")) == PRESETS["tiny"]
    monkeypatch.setenv("VIDEOQA_PRESET", "paper-7b")
    assert compression_config(Settings(model=str(checkpoint))) == PRESETS["paper-7b"]


def test_evidence_heads_carry_without_touching_the_compression(checkpoint):
    evidence = {"heads": [[3, 1], [0, 2]], "calibration": {"seed": 4}}
    path = write_evidence(checkpoint, evidence)
    settings = read_checkpoint_settings(checkpoint)
    assert json.loads(path.read_text()) == {**CARRIED, "evidence": evidence}
    assert evidence_config(settings) == EvidenceConfig(heads=((3, 1), (0, 2)))
    assert with_settings(CompressionConfig(), settings) == with_settings(CompressionConfig(), CARRIED)
    assert evidence_config({}) == EvidenceConfig()  # uncalibrated: every head of the question's prefill
