"""A video's vision features: decoded and encoded once, compressed under any number of settings.

Everything a compression needs from the pixels is the vision tower's output per temporal grid, the
sampled frames' timestamps and the token layout. `worker.engine.vision.encode_video` computes them;
`compress_video(..., features=...)` then skips decoding and vision, with results bit-identical to
compressing from the video (the vision tower always runs in slices of `VISION_SLICE_GRIDS` grids,
whatever the chunk size, so both paths see the same numbers). The index step keeps them beside the
artifact so question-guided answers reuse them. One file holds them, checksummed like the artifact:

    tensors    embeds       [video_tokens, hidden_size], `STORED_DTYPE` (bf16) unless already narrower
               timestamps   [num_frames] float64
    metadata   format       FEATURES_FORMAT, as a string
               layout       JSON of `VideoLayout`
               metadata     JSON: model revision, sampling settings, seconds spent
               checksum     sha256 hex over the above and every tensor (artifact.checksum)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.engine.artifact import (
    ArtifactError,
    check_header,
    encode_checksummed,
    metadata_json,
    read_safetensors,
    write_atomically,
)
from worker.engine.config import SamplingConfig

if TYPE_CHECKING:  # the file format stays importable without transformers (the stores use it)
    from worker.engine.models import LoadedModel

FEATURES_FORMAT = 1  # bump when the layout changes
STORED_DTYPE = torch.bfloat16  # on disk: half the bytes of fp32, the model's own dtype on a GPU
_HEADER_FIELDS = ("format", "layout", "metadata")


@dataclass
class VideoLayout:
    """Token arithmetic of one video under one model and sampling."""

    num_frames: int
    duration: float
    grid_thw: tuple[int, int, int]
    tokens_per_grid: int
    seconds_per_grid: float

    @property
    def num_tokens(self) -> int:
        return self.grid_thw[0] * self.tokens_per_grid


@dataclass
class VisionFeatures:
    """The vision tower's output for a whole sampled video, ready for any compression of it.

    Args:
        embeds (torch.Tensor): `[video_tokens, hidden_size]` LLM-ready video tokens in temporal order.
        timestamps (list[float]): seconds of every sampled frame.
        layout (VideoLayout): frames, grid and tokens per grid.
        metadata (dict[str, Any]): "model_revision" and "sampling" (the settings that made them) and
            "seconds" (decode, vision) spent encoding.
    """

    embeds: torch.Tensor
    timestamps: list[float]
    layout: VideoLayout
    metadata: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()

    def grid_means(self, grids_at_once: int = 64) -> torch.Tensor:
        """`[num_grids, hidden_size]` float32 mean of each temporal grid's tokens, upcast a few grids at a
        time so no fp32 copy of the whole video is made."""
        grids = self.embeds.view(self.layout.grid_thw[0], self.layout.tokens_per_grid, -1)
        return torch.cat([part.float().mean(dim=1).cpu() for part in grids.split(grids_at_once)])

    def check_fits(self, loaded: LoadedModel, sampling: SamplingConfig) -> None:
        """ValueError unless these features are what `encode_video(loaded, ..., sampling)` would give."""
        if self.metadata.get("model_revision") != loaded.revision:
            raise ValueError(
                f"vision features of model {self.metadata.get('model_revision')!r}, not {loaded.revision!r}"
            )
        if self.metadata.get("sampling") != asdict(sampling):
            raise ValueError(
                f"vision features sampled with {self.metadata.get('sampling')}, not {asdict(sampling)}"
            )
        hidden = loaded.model.config.get_text_config().hidden_size
        if tuple(self.embeds.shape) != (self.layout.num_tokens, hidden):
            raise ValueError(
                f"vision features of shape {list(self.embeds.shape)}, the layout needs "
                f"[{self.layout.num_tokens}, {hidden}]"
            )


def save_features(features: VisionFeatures, path: Path) -> int:
    """Write `features` to `path` atomically, embeddings in `STORED_DTYPE` (or narrower) -> bytes written."""
    embeds = features.embeds.detach().cpu()
    if embeds.element_size() > torch.finfo(STORED_DTYPE).bits // 8:
        embeds = embeds.to(STORED_DTYPE)
    tensors = {
        "embeds": embeds.contiguous(),
        "timestamps": torch.tensor(features.timestamps, dtype=torch.float64).reshape(-1),
    }
    header = {
        "format": str(FEATURES_FORMAT),
        "layout": json.dumps(asdict(features.layout), sort_keys=True),
        "metadata": metadata_json(features.metadata),
    }
    return write_atomically(Path(path), *encode_checksummed(tensors, header))


def load_features(path: Path, device: str | torch.device = "cpu") -> VisionFeatures:
    """Read features written by `save_features`, embeddings on `device` in their stored dtype.

    Raises FileNotFoundError when there is no file, ArtifactError when it is not valid features of this
    format version.
    """
    source = str(path)
    header, tensors = read_safetensors(path)
    header = check_header(
        header,
        tensors,
        fields=_HEADER_FIELDS,
        fmt=FEATURES_FORMAT,
        kind="vision-features file",
        source=source,
    )
    if set(tensors) != {"embeds", "timestamps"}:
        raise ArtifactError(f"{source}: unexpected tensors {sorted(tensors)}")
    try:
        layout = json.loads(header["layout"])
        layout = VideoLayout(**{**layout, "grid_thw": tuple(layout["grid_thw"])})
        features = VisionFeatures(
            embeds=tensors["embeds"].to(device),
            timestamps=tensors["timestamps"].tolist(),
            layout=layout,
            metadata=json.loads(header["metadata"]),
        )
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise ArtifactError(f"{source}: inconsistent vision features: {e}") from e
    if features.embeds.dim() != 2 or features.embeds.shape[0] != layout.num_tokens:
        raise ArtifactError(
            f"{source}: embeddings {list(features.embeds.shape)} do not fit {layout.num_tokens} video tokens"
        )
    if len(features.timestamps) != layout.num_frames:
        raise ArtifactError(f"{source}: {len(features.timestamps)} timestamps for {layout.num_frames} frames")
    return features
