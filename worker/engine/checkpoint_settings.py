"""Compression defaults a checkpoint carries with it (`videoqa.json` in its folder).

A checkpoint trained on small frames or at a low frame rate must be served the way it was trained, and
nobody should have to remember how: its folder may hold a `videoqa.json` such as
`{"sampling": {"fps": 2, "long_side": 112}, "guide_prompt": "Describe every shape ..."}`. The CLI and
the worker start from these; explicit flags (or an explicitly set preset) still win.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from worker.engine.adaretake import CompressionConfig
from worker.engine.config import SamplingConfig

SETTINGS_FILE = "videoqa.json"
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
    unknown = set(settings) - _FIELDS - {"sampling"}
    unknown |= {f"sampling.{name}" for name in set(settings.get("sampling", {})) - _SAMPLING_FIELDS}
    if unknown:
        raise ValueError(f"{path} names unknown settings: {', '.join(sorted(unknown))}")
    return settings


def with_settings(config: CompressionConfig, settings: dict) -> CompressionConfig:
    """`config` with the entries of `settings` (the `videoqa.json` layout) replacing its own."""
    sampling = dataclasses.replace(config.sampling, **settings.get("sampling", {}))
    rest = {name: value for name, value in settings.items() if name != "sampling"}
    return dataclasses.replace(config, sampling=sampling, **rest)
