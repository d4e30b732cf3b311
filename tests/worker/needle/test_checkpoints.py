"""The committed needle checkpoints (models/needle/): they are the weights their training record names, the
run that made them repeats its first steps from the seed, they load through `from_pretrained` and answer
needle videos they never saw, and the CLI uses the sampling settings they carry."""

import json
from pathlib import Path

import pytest

from worker.engine.answer import answer_uncompressed
from worker.engine.checkpoint_settings import read_checkpoint_settings
from worker.engine.config import SamplingConfig
from worker.engine.models import load_model
from worker.needle.train import FAMILIES, RECORD_FILE, TrainConfig, train, weights_sha256
from worker.needle.videos import answer_matches, colour_question, random_spec, write_video
from worker.tools.cli import main

CHECKPOINTS = Path(__file__).resolve().parents[3] / "models" / "needle"


def record(family: str) -> dict:
    return json.loads((CHECKPOINTS / family / RECORD_FILE).read_text())


def needle_videos(directory: Path, count: int, seconds: float) -> list[tuple[Path, object]]:
    """Held-out needle videos (evaluation footage, one shape) and their colour questions."""
    specs = [random_spec(900 + index, seconds, "eval", distractors=0) for index in range(count)]
    return [
        (write_video(spec, directory / f"needle-{i}.mp4"), colour_question(spec))
        for i, spec in enumerate(specs)
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_committed_weights_are_the_recorded_ones(family):
    assert weights_sha256(CHECKPOINTS / family) == record(family)["weights_sha256"]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_repeats_its_recorded_first_steps_from_the_seed(family):
    config = TrainConfig(**record(family)["config"])
    assert config == TrainConfig(family=family)  # the committed run is the trainer's default
    result = train(config, stop_after=2)
    assert result.losses == pytest.approx(record(family)["first_losses"][:2], rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_answers_held_out_needle_videos_uncompressed(family, tmp_path):
    folder = CHECKPOINTS / family
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    sampling = SamplingConfig(**read_checkpoint_settings(folder)["sampling"])
    videos = needle_videos(tmp_path, 5, TrainConfig().max_seconds)
    right = []
    for path, qa in videos:
        answer = answer_uncompressed(loaded, path, qa.question, sampling=sampling, max_new_tokens=4)
        right.append(answer_matches(answer.text, qa.answer))
    assert sum(right) >= 4, right


def test_the_cli_answers_the_colour_with_the_settings_the_checkpoint_carries(tmp_path, capsys):
    video = tmp_path / "needle.mp4"
    seconds = TrainConfig().max_seconds
    assert main(["make-needle", str(video), "--seconds", str(seconds), "--seed", "900"]) == 0
    question, expected = capsys.readouterr().out.strip().split("\t")
    common = [
        "--model",
        str(CHECKPOINTS / "qwen2_5_vl"),
        "--max-new-tokens",
        "4",
        "--cache-dir",
        str(tmp_path),
    ]
    assert main(["ask", str(video), question, *common]) == 0
    out, err = capsys.readouterr()
    assert answer_matches(out.splitlines()[0], expected), out
    assert f"{round(seconds * TrainConfig().fps)} frames" in err  # the checkpoint's 2 fps, not the default's
    # --budget forces the compression ratio: fewer video tokens kept than the checkpoint's default keeps
    assert main(["ask", str(video), question, *common, "--budget", "60"]) == 0
    _, forced = capsys.readouterr()
    kept = [float(line.split("->")[1].split()[0]) for text in (err, forced) for line in text.splitlines()
            if "video tokens" in line]  # fmt: skip
    assert kept[1] < kept[0], (err, forced)
