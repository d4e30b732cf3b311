"""Where compressed-KV artifacts live: a key, a small store interface, and a directory of files.

In the spirit of LMCache's storage backends: the engine depends on `ArtifactStore` only, and tiers (this
disk store; the in-process LRU and the Redis-indexed disk tier of worker/serving/tiers.py) are implementations
behind it. `get_or_build` is the read-through every caller uses: look up, else build once and store.
"""

import contextlib
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from worker.engine.artifact import ArtifactError, CompressedKV, load_artifact, save_artifact
from worker.engine.features import VisionFeatures, load_features, save_features
from worker.engine.timing import StageTimer

KEY_VERSION = "v1"  # first part of every key string; bump when the key layout changes
_HEX = re.compile(r"[0-9a-f]{8,128}")
# Letters, digits, ".", "_", "-", not starting with a dot: safe as a file name and in a Redis key.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ArtifactKey:
    """Everything that decides an artifact's content.

    Its string form is `v1/<video_hash>/<model_revision>/<settings_hash>`: the key layout version, then the
    three fields. The hashes are lowercase hex (8 to 128 digits); the revision is letters, digits, ".",
    "_" and "-" (at most 128, not starting with a dot). So no part holds a "/" or is "." or "..", and the
    string is safe as a relative path and as a Redis key.

    Args:
        video_hash (str): sha256 hex of the video file's content (`file_sha256`).
        model_revision (str): the model's revision, e.g. "local-<fingerprint>" or a 40-hex commit.
        settings_hash (str): hash of every setting that changes the result (`settings_hash`).
    """

    video_hash: str
    model_revision: str
    settings_hash: str

    def __post_init__(self):
        for name, pattern in (("video_hash", _HEX), ("model_revision", _TOKEN), ("settings_hash", _HEX)):
            value = getattr(self, name)
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"malformed {name} {value!r}: must match {pattern.pattern}")

    def to_string(self) -> str:
        return f"{KEY_VERSION}/{self.video_hash}/{self.model_revision}/{self.settings_hash}"

    @classmethod
    def from_string(cls, s: str) -> "ArtifactKey":
        """Inverse of `to_string`; ValueError on anything else."""
        parts = s.split("/") if isinstance(s, str) else []
        if len(parts) != 4 or parts[0] != KEY_VERSION:
            expected = f"{KEY_VERSION}/<video_hash>/<model_revision>/<settings_hash>"
            raise ValueError(f"malformed artifact key {s!r}: expected {expected}")
        return cls(*parts[1:])


class ArtifactStore(ABC):
    """A place to keep artifacts by key. Usable as a context manager, which closes it.

    `tier` names the store in cache reports ("memory", "disk"); a store made of several tiers overrides
    `get_with_tier` to say which one answered.
    """

    tier: str = "store"

    @abstractmethod
    def put(self, key: ArtifactKey, artifact: CompressedKV) -> int:
        """Store `artifact` under `key`, replacing what was there; return the bytes stored."""

    @abstractmethod
    def get(self, key: ArtifactKey) -> CompressedKV | None:
        """The artifact under `key`, or None on a miss. Raises ArtifactError when it is damaged: rebuild."""

    @abstractmethod
    def contains(self, key: ArtifactKey) -> bool: ...

    @abstractmethod
    def delete(self, key: ArtifactKey) -> bool:
        """Remove the artifact under `key`; False when there was none."""

    @abstractmethod
    def keys(self) -> Iterator[ArtifactKey]: ...

    def get_with_tier(self, key: ArtifactKey) -> tuple[CompressedKV | None, str]:
        """`get`, and the name of the tier that had it ("none" on a miss)."""
        artifact = self.get(key)
        return artifact, self.tier if artifact is not None else "none"

    def put_features(self, key: ArtifactKey, features: VisionFeatures) -> int:
        """Keep the vision features the artifact under `key` was compressed from, for question-guided
        compressions of the same video; the bytes stored (0: this store does not keep them)."""
        return 0

    def get_features(self, key: ArtifactKey) -> VisionFeatures | None:
        """The features `put_features` kept under `key`, or None. Raises ArtifactError when damaged."""
        return None

    def close(self) -> None:  # noqa: B027 (deliberately optional: a disk store holds nothing open)
        """Release connections or handles, if any."""

    def __enter__(self) -> "ArtifactStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DiskStore(ArtifactStore):
    """One safetensors file per key under `root`, at `root/<key string>.safetensors`, and the vision
    features it was compressed from beside it, at `root/<key string>.features.safetensors`; `delete`
    removes both.

    Writes are atomic (`save_artifact`), so readers, including other processes sharing the directory,
    see a whole artifact or none, and two writers of one key leave one of their (equal) results.

    Args:
        root (Path): the directory; created when missing.
        device (str | torch.device): where `get` puts the tensors.
    """

    SUFFIX = ".safetensors"
    FEATURES_SUFFIX = ".features.safetensors"
    tier = "disk"

    def __init__(self, root: Path, device: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        self.device = device
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: ArtifactKey) -> Path:
        return self.root / f"{key.to_string()}{self.SUFFIX}"

    def features_path_for(self, key: ArtifactKey) -> Path:
        return self.root / f"{key.to_string()}{self.FEATURES_SUFFIX}"

    def put_features(self, key: ArtifactKey, features: VisionFeatures) -> int:
        path = self.features_path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_features(features, path)

    def get_features(self, key: ArtifactKey) -> VisionFeatures | None:
        try:
            return load_features(self.features_path_for(key), self.device)
        except FileNotFoundError:
            return None

    def put(self, key: ArtifactKey, artifact: CompressedKV) -> int:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_artifact(artifact, path)

    def get(self, key: ArtifactKey) -> CompressedKV | None:
        try:
            return load_artifact(self.path_for(key), self.device)
        except FileNotFoundError:  # asking first and then loading would race with delete
            return None

    def contains(self, key: ArtifactKey) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: ArtifactKey) -> bool:
        # Empty directories are left behind on purpose: removing them would race with a concurrent put.
        self.features_path_for(key).unlink(missing_ok=True)
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> Iterator[ArtifactKey]:
        """Keys of the stored artifacts, in sorted order. Temporary files and foreign files are skipped."""
        for path in sorted(self.root.glob(f"{KEY_VERSION}/*/*/*{self.SUFFIX}")):
            relative = path.relative_to(self.root).as_posix()
            try:
                yield ArtifactKey.from_string(relative.removesuffix(self.SUFFIX))
            except ValueError:
                continue

    def nbytes(self, key: ArtifactKey) -> int | None:
        """Size of the stored artifact file, or None when there is none."""
        try:
            return self.path_for(key).stat().st_size
        except FileNotFoundError:
            return None

    def features_nbytes(self, key: ArtifactKey) -> int | None:
        """Bytes of the stored features file, or None when there is none."""
        try:
            return self.features_path_for(key).stat().st_size
        except FileNotFoundError:
            return None


# ---- read-through with single flight -------------------------------------------------------------


class BuildLease(Protocol):
    """What a `BuildLock` yields once the caller may build: whether it waited for another builder first, and
    a fence check made just before the result is stored."""

    waited: bool

    def check(self) -> None:
        """Raise when a newer builder took the key over: storing now would overwrite its result."""


# A lock factory for `get_or_build`: a context manager per key, entered once the caller may build the
# artifact (worker/serving/tiers.py `SingleFlight`: a Redis lease with a fencing token).
BuildLock = Callable[[ArtifactKey], contextlib.AbstractContextManager[BuildLease]]


@dataclass
class Obtained:
    """An artifact and how `get_or_build` got it.

    Args:
        hit (bool): found in the store (possibly after waiting for another builder), not built here.
        tier (str): the tier that had it ("memory", "disk"), or "none" when it was built here.
        reason (str): "" on a hit; why it was built: "absent", or "corrupt: ..." when the stored one was
            refused (the put replaces it).
        nbytes (int): bytes of the artifact as stored (or held in memory on a memory hit).
        waited (bool): another builder held the key's lock first.
    """

    artifact: CompressedKV
    hit: bool
    tier: str
    reason: str
    nbytes: int
    waited: bool = False


def get_or_build(
    store: ArtifactStore,
    key: ArtifactKey,
    build: Callable[[], CompressedKV],
    *,
    lock: BuildLock | None = None,
    timer: StageTimer | None = None,
) -> Obtained:
    """The artifact under `key`, building and storing it first when it is absent or damaged.

    With a `lock`, concurrent callers (threads, processes, machines sharing the store) build a key once:
    the first builds under the lock; the others wait for it, then find the artifact in the store.
    `timer`, when given, is charged "load", "wait" and "store" seconds.
    """
    timer = timer or StageTimer()
    with timer.stage("load"):
        artifact, tier, reason = _lookup(store, key)
    if artifact is not None:
        return Obtained(artifact, True, tier, "", artifact.nbytes)
    with contextlib.ExitStack() as stack:
        waited = False
        if lock is not None:
            with timer.stage("wait"):
                lease = stack.enter_context(lock(key))
                waited = lease.waited
            with timer.stage("load"):  # built by whoever held the lock before us?
                artifact, tier, again = _lookup(store, key)
            if artifact is not None:
                return Obtained(artifact, True, tier, "", artifact.nbytes, waited)
            reason = reason if reason.startswith("corrupt") else again
        artifact = build()
        if lock is not None:
            lease.check()  # a builder whose lease lapsed (paused, cut off) stores nothing over a newer one
        with timer.stage("store"):
            nbytes = store.put(key, artifact)
    return Obtained(artifact, False, "none", reason, nbytes, waited)


def _lookup(store: ArtifactStore, key: ArtifactKey) -> tuple[CompressedKV | None, str, str]:
    """(artifact or None, tier, why it is missing). A damaged artifact is a miss: it gets rebuilt."""
    try:
        artifact, tier = store.get_with_tier(key)
    except ArtifactError as error:
        return None, "none", f"corrupt: {error}"
    return artifact, tier, "absent"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's content, read in `chunk`-byte blocks so memory does not grow with its size."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying a JSON-serialisable settings dict; independent of key order.

    Values are hashed as JSON, so 2 and 2.0 differ: build the dict from typed settings (a frozen dataclass
    through `dataclasses.asdict`), not from hand-written literals. Raises TypeError or ValueError for what
    JSON cannot hold (NaN included).
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
