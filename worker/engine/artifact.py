"""The compressed KV cache of one video, and its file format. torch and safetensors only.

A video is compressed once and answers many questions, so the cache outlives the process that built
it. One artifact is one safetensors file:

    tensors    layers.{i}.keys, layers.{i}.values    [1, kv_heads, len_i, head_dim], the model's dtype
               layers.{i}.token_frames               [len_i] int32
               timestamps                            [num_frames] float64
    metadata   format          ARTIFACT_FORMAT, as a string
               next_position   the M-RoPE position where text1 starts, as a string
               metadata        JSON of `CompressedKV.metadata` (sorted keys)
               checksum        sha256 hex, see `checksum`

The checksum covers the three other metadata strings and every tensor's name, dtype, shape and raw
bytes, so it is computed on the tensors and stored in the same file's header. A flipped bit anywhere that
matters, a truncated file or a file from another format version is refused with `ArtifactError`, and
callers rebuild the artifact: a wrong cache would answer silently wrong, a refused one only costs time.
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

ARTIFACT_FORMAT = 1  # bump when the layout changes
_HEADER_FIELDS = ("format", "next_position", "metadata")


@dataclass
class CompressedKV:
    """Per-layer keys/values of [text0 | kept video tokens], plus what is needed to continue and to explain.

    Args:
        keys (list[torch.Tensor]): per layer `[1, kv_heads, len_l, head_dim]`; `len_l` differs per layer.
        values (list[torch.Tensor]): same shapes and dtype as `keys`.
        token_frames (list[torch.Tensor]): per layer `[len_l]` int32, the sampled-frame index of each cached
            token; -1 for text tokens (text0).
        next_position (int): M-RoPE position of the first token after the video (text1 starts here).
        timestamps (list[float]): seconds of every sampled frame (index -> time).
        metadata (dict[str, Any]): JSON-serialisable: model id and revision, settings and their hash, video
            content hash, counts, report. Stored as JSON, so tuples come back as lists.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_frames: list[torch.Tensor]
    next_position: int
    timestamps: list[float]
    metadata: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def lengths(self) -> list[int]:
        """Cached tokens per layer, text0 included."""
        return [k.shape[2] for k in self.keys]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (token frames and timestamps are negligible)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "CompressedKV":
        """A copy on `device`; `dtype`, when given, applies to keys and values only."""
        return CompressedKV(
            keys=[k.to(device, dtype) for k in self.keys],
            values=[v.to(device, dtype) for v in self.values],
            token_frames=[f.to(device) for f in self.token_frames],
            next_position=self.next_position,
            timestamps=list(self.timestamps),
            metadata=copy.deepcopy(self.metadata),
        )

    def validate(self) -> None:
        """Raise ValueError when the parts do not fit together."""
        if not len(self.keys) == len(self.values) == len(self.token_frames):
            raise ValueError(
                f"{len(self.keys)} layers of keys, {len(self.values)} of values and "
                f"{len(self.token_frames)} of token frames"
            )
        if not self.keys:
            raise ValueError("an artifact needs at least one layer")
        first = self.keys[0]
        layers = zip(self.keys, self.values, self.token_frames, strict=True)
        for layer_idx, (k, v, frames) in enumerate(layers):
            where = f"layer {layer_idx}"
            if k.dim() != 4 or k.shape[0] != 1:
                raise ValueError(f"{where}: keys must be [1, kv_heads, seq, head_dim], got {list(k.shape)}")
            if v.shape != k.shape:
                raise ValueError(f"{where}: values {list(v.shape)} differ from keys {list(k.shape)}")
            if (k.shape[1], k.shape[3]) != (first.shape[1], first.shape[3]):
                raise ValueError(
                    f"{where}: kv_heads x head_dim {k.shape[1]} x {k.shape[3]} differ from layer 0's "
                    f"{first.shape[1]} x {first.shape[3]}"
                )
            if k.dtype != first.dtype or v.dtype != first.dtype:
                raise ValueError(f"{where}: keys {k.dtype} / values {v.dtype}, layer 0 keys {first.dtype}")
            if frames.dtype != torch.int32 or frames.shape != (k.shape[2],):
                raise ValueError(
                    f"{where}: token_frames must be int32 [{k.shape[2]}], "
                    f"got {frames.dtype} {list(frames.shape)}"
                )
            if frames.numel() and not (frames.min() >= -1 and frames.max() < len(self.timestamps)):
                raise ValueError(
                    f"{where}: token_frames outside [-1, {len(self.timestamps)}): "
                    f"{int(frames.min())}..{int(frames.max())}"
                )
        position = self.next_position
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"next_position must be a non-negative int, got {self.next_position!r}")
        if not all(isinstance(t, int | float) and math.isfinite(t) for t in self.timestamps):
            raise ValueError("timestamps must be finite numbers")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        metadata_json(self.metadata)


class ArtifactError(Exception):
    """A stored artifact cannot be used: damaged, truncated, not an artifact, or another format version.

    `code` is stable and machine-readable; the message says what is wrong and in which file. Callers
    rebuild the artifact.
    """

    code = "artifact_corrupt"


def save_artifact(artifact: CompressedKV, path: Path) -> int:
    """Write `artifact` to `path` atomically (see `write_atomically`) and return the bytes written.
    Raises ValueError for an inconsistent artifact."""
    return write_atomically(Path(path), *_encode(artifact))


def write_atomically(path: Path, header: bytes, body: bytes | memoryview) -> int:
    """Write `header` then `body` to `path` so that it appears complete or not at all; the bytes written.

    The bytes go to a temporary file in the same directory, are flushed to disk and then renamed over
    `path`, so a reader never sees half a file and a crash mid-write leaves the previous one in place.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the cache from other worker users
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return len(header) + len(body)


def load_artifact(path: Path, device: str | torch.device = "cpu") -> CompressedKV:
    """Read an artifact written by `save_artifact` and move it to `device`.

    Raises FileNotFoundError when there is no file, ArtifactError when the file is not a valid artifact
    of this format version.
    """
    header, tensors = read_safetensors(path)
    return _decode(header, tensors, str(path)).to(device)


def read_safetensors(path: Path) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """(header metadata, tensors) of a safetensors file, on CPU. FileNotFoundError when there is none;
    ArtifactError when it is not a readable safetensors file."""
    try:
        # safe_open memory-maps the file: only the tensors themselves take memory.
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from e


def artifact_to_bytes(artifact: CompressedKV) -> bytes:
    """The exact bytes `save_artifact` would write, for an in-memory or network tier."""
    header, body = _encode(artifact)
    return header + body


def artifact_from_bytes(
    data: bytes, device: str | torch.device = "cpu", source: str = "<bytes>"
) -> CompressedKV:
    """Inverse of `artifact_to_bytes`; `source` names the blob in error messages (a key, a URL)."""
    try:
        header = _read_header(data).get("__metadata__")
        tensors = safetensors.torch.load(bytes(data))
    except (SafetensorError, ValueError) as e:
        raise ArtifactError(f"{source}: not a readable safetensors blob ({e})") from e
    return _decode(header, tensors, source).to(device)


def _encode(artifact: CompressedKV) -> tuple[bytes, memoryview]:
    """Serialise to (header, data section); kept apart so a file write does not copy the data again."""
    artifact.validate()
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for layer_idx in range(artifact.num_layers):
        for part in ("keys", "values", "token_frames"):
            tensor = getattr(artifact, part)[layer_idx].detach().to("cpu").contiguous()
            # safetensors refuses two names for overlapping memory (e.g. one token_frames tensor reused
            # by several layers); a copy of a tensor whose buffer was already taken is always safe.
            storage = tensor.untyped_storage().data_ptr()
            if tensor.numel() and storage in seen:
                tensor = tensor.clone()
                storage = tensor.untyped_storage().data_ptr()
            seen.add(storage)
            tensors[f"layers.{layer_idx}.{part}"] = tensor
    tensors["timestamps"] = torch.tensor(artifact.timestamps, dtype=torch.float64).reshape(-1)
    header = {
        "format": str(ARTIFACT_FORMAT),
        "next_position": str(artifact.next_position),
        "metadata": metadata_json(artifact.metadata),
    }
    return encode_checksummed(tensors, header)


def encode_checksummed(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> tuple[bytes, memoryview]:
    """safetensors bytes of `tensors` with `header` and its "checksum" (see `checksum`; every header field
    is covered, in the order given), as (length prefix and canonical header, data section): kept apart so a
    file write does not copy the data again."""
    header = {**header, "checksum": checksum(header, tensors, tuple(header))}
    data = safetensors.torch.save(tensors, metadata=header)
    return _canonical_header(data), memoryview(data)[8 + _header_length(data) :]


def check_header(
    header: Mapping[str, str] | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    fields: tuple[str, ...],
    fmt: int,
    kind: str,
    source: str,
) -> Mapping[str, str]:
    """The header of a file written by `encode_checksummed` with `fields` ("format" first), of `kind` in
    format `fmt`. ArtifactError when it is another kind or version, lacks a field or fails its checksum."""
    header = header or {}
    if "format" not in header:
        raise ArtifactError(f"{source}: not a {kind} (no format in its header)")
    if header["format"] != str(fmt):
        raise ArtifactError(f"{source}: {kind} format {header['format']!r}, this worker reads format {fmt}")
    missing = [key for key in (*fields, "checksum") if key not in header]
    if missing:
        raise ArtifactError(f"{source}: header lacks {', '.join(missing)}")
    if checksum(header, tensors, fields) != header["checksum"]:
        raise ArtifactError(f"{source}: checksum mismatch, the file is damaged")
    return header


def _decode(header: Mapping[str, str] | None, tensors: dict[str, torch.Tensor], source: str) -> CompressedKV:
    """Check a parsed file (format, checksum, names, shapes) and build the artifact, on CPU."""
    header = check_header(
        header,
        tensors,
        fields=_HEADER_FIELDS,
        fmt=ARTIFACT_FORMAT,
        kind="compressed-KV artifact",
        source=source,
    )

    num_layers = sum(name.endswith(".keys") for name in tensors)
    expected = {"timestamps"} | {
        f"layers.{i}.{part}" for i in range(num_layers) for part in ("keys", "values", "token_frames")
    }
    if set(tensors) != expected:
        raise ArtifactError(
            f"{source}: unexpected tensors {sorted(set(tensors) - expected)}, "
            f"missing {sorted(expected - set(tensors))}"
        )
    try:
        artifact = CompressedKV(
            keys=[tensors[f"layers.{i}.keys"] for i in range(num_layers)],
            values=[tensors[f"layers.{i}.values"] for i in range(num_layers)],
            token_frames=[tensors[f"layers.{i}.token_frames"] for i in range(num_layers)],
            next_position=int(header["next_position"]),
            timestamps=tensors["timestamps"].tolist(),
            metadata=json.loads(header["metadata"]),
        )
        artifact.validate()
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ArtifactError(f"{source}: inconsistent artifact: {e}") from e
    return artifact


def checksum(header: Mapping[str, str], tensors: Mapping[str, torch.Tensor], fields: Iterable[str]) -> str:
    """sha256 hex over the header's `fields` and every tensor's name, dtype, shape and raw bytes (by name).

    Every piece is length-prefixed, so no two different inputs hash the same stream. Raw bytes, not
    numpy values: numpy has no bfloat16, and a byte view is exact for every dtype.
    """
    digest = hashlib.sha256()

    def feed(*parts: str | memoryview) -> None:
        for part in parts:
            raw = memoryview(part.encode()) if isinstance(part, str) else part
            digest.update(raw.nbytes.to_bytes(8, "little"))
            digest.update(raw)

    for field in fields:
        feed(field, header[field])
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        feed(name, str(tensor.dtype), _shape_string(tensor.shape))
        feed(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _shape_string(shape: Iterable[int]) -> str:
    return ",".join(str(n) for n in shape)


def metadata_json(metadata: Mapping[str, Any]) -> str:
    try:
        return json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e


def _header_length(data: bytes | memoryview) -> int:
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError(f"header of {length} bytes in a blob of {len(data)}")
    return length


def _read_header(data: bytes | memoryview) -> dict[str, Any]:
    header = json.loads(bytes(data[8 : 8 + _header_length(data)]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _canonical_header(data: bytes) -> bytes:
    """The length prefix and header of `data`, re-encoded with sorted keys.

    safetensors writes its metadata map in hash order, which changes from process to process; sorting
    makes equal artifacts equal bytes, so files can be compared and deduplicated. Tensor offsets are
    relative to the end of the header, so the data section stays valid as it is. Padded with spaces to a
    multiple of 8 bytes like safetensors does, which keeps the data aligned.
    """
    text = json.dumps(_read_header(data), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable. Best effort: not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
