"""The shard-set manifest: which shards exist, how many samples each holds, their sha256.

``manifest.json`` sits beside the shards. It is the contract between ``data_prep`` (writes it),
the training loader (reads shard names and counts to index samples globally) and eval.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class ShardInfo:
    """One tar shard: file name (relative to the manifest), sample count, sha256 and size."""

    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything a reader needs to know about a shard directory.

    Samples are numbered globally in shard order: sample ``j`` of shard ``i`` has global index
    ``shard_offsets()[i] + j``. ``skipped`` records source files that could not be read.
    """

    shards: list[ShardInfo]
    classes: list[str] | None = None
    source: str = ""
    source_kind: str = ""
    skipped: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_offsets(self) -> list[int]:
        """Global index of the first sample of each shard."""
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard.num_samples
        return offsets

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["num_shards"] = self.num_shards
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically (temporary file, then rename)."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".tmp")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; readers may be other users
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Read ``directory/manifest.json``; raises ``FileNotFoundError`` with a clear message."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a shard directory written by "
                "'python -m data_prep write'"
            )
        d = json.loads(path.read_text())
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: unsupported manifest version {d.get('version')!r}")
        return cls(
            shards=[ShardInfo(**s) for s in d["shards"]],
            classes=d.get("classes"),
            source=d.get("source", ""),
            source_kind=d.get("source_kind", ""),
            skipped=d.get("skipped", []),
            options=d.get("options", {}),
        )


def is_shard_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a ``manifest.json`` (a shard directory, not an image folder)."""
    return (Path(path) / MANIFEST_NAME).is_file()
