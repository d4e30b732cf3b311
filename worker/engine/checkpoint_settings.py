"""Compression defaults a checkpoint carries with it (`videoqa.json` in its folder).

A checkpoint trained on small frames or at a low frame rate must be served the way it was trained, and
nobody should have to remember how: its folder may hold a `videoqa.json` such as
`{"sampling": {"fps": 2, "long_side": 112}, "guide_prompt": "Describe every shape ..."}`. The CLI and
the worker start from these; explicit flags (or an explicitly set preset) still win.

Its `evidence` entry, written by `videoqa calibrate-evidence`, names the attention heads whose view of the
video points at the moment a question asks about (`worker.engine.evidence`); it changes no cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from worker.engine.adaretake import CompressionConfig
from worker.engine.config import SamplingConfig
from worker.engine.evidence import EvidenceConfig

SETTINGS_FILE = "videoqa.json"
EVIDENCE = "evidence"
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingConfig)}
_FIELDS = {f.name for f in dataclasses.fields(CompressionConfig)} - {"sampling"}


def read_checkpoint_settings(model: str | Path) -> dict:
    """The settings of a local checkpoint folder; {} for a hub id or a folder without the file.

    Raises:
        ValueError: the file is not JSON, or names a setting that does not exist.
    """
    path = Path(model) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object")
    unknown = set(settings) - _FIELDS - {"sampling", EVIDENCE}
    unknown |= {f"sampling.{name}" for name in set(settings.get("sampling", {})) - _SAMPLING_FIELDS}
    if unknown:
        raise ValueError(f"{path} names unknown settings: {', '.join(sorted(unknown))}")
    try:
        evidence_config(settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    return settings


def evidence_config(settings: dict) -> EvidenceConfig:
    """The evidence heads the settings name; the default (every head) when they name none."""
    return EvidenceConfig.from_settings(settings.get(EVIDENCE, {}))


def write_evidence(model: str | Path, evidence: dict) -> Path:
    """Put `evidence` into the checkpoint folder's `videoqa.json` (created if absent), the rest kept."""
    path = Path(model) / SETTINGS_FILE
    settings = read_checkpoint_settings(model)
    EvidenceConfig.from_settings(evidence)  # refuse what could not be read back
    path.write_text(json.dumps({**settings, EVIDENCE: evidence}, indent=2) + "\n")
    return path


def with_settings(config: CompressionConfig, settings: dict) -> CompressionConfig:
    """`config` with the entries of `settings` (the `videoqa.json` layout) replacing its own."""
    sampling = dataclasses.replace(config.sampling, **settings.get("sampling", {}))
    rest = {name: value for name, value in settings.items() if name not in ("sampling", EVIDENCE)}
    return dataclasses.replace(config, sampling=sampling, **rest)
