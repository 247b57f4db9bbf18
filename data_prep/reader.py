"""Reading samples back out of WebDataset tar shards, member by member.

A sample is the group of consecutive tar members that share a key (``000123.jpg``,
``000123.cls``, ``000123.json``). Shards are read in streaming mode, so a truncated or corrupt
tar yields every sample before the damage and then raises :class:`ShardReadError`.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")


class ShardReadError(RuntimeError):
    """A shard could not be read to its end (truncated, corrupt header, ...)."""


@dataclass
class RawSample:
    """One sample's raw member bytes, keyed by extension (``"jpg"``, ``"cls"``, ``"json"``).

    ``position`` is the sample's index within its shard (0-based, in tar order).
    """

    key: str
    position: int
    files: dict[str, bytes] = field(default_factory=dict)

    def image_bytes(self) -> tuple[str, bytes]:
        """The (extension, bytes) of the sample's image member; ``KeyError`` if it has none."""
        for ext in IMAGE_EXTS:
            if ext in self.files:
                return ext, self.files[ext]
        raise KeyError(f"sample {self.key!r} has no image member (members: {sorted(self.files)})")

    def label(self) -> int | None:
        """The integer class label from the ``cls`` member, or ``None`` for unlabelled data."""
        raw = self.files.get("cls")
        return None if raw is None else int(raw.decode().strip())

    def meta(self) -> dict:
        raw = self.files.get("json")
        return {} if raw is None else json.loads(raw)


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg" -> ("dir/000123", "jpg")``: the key ends at the first dot of the basename."""
    base_dir, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{base_dir}/{stem}" if base_dir else stem
    return key, ext.lower() if dot else ""


def iter_tar_samples(path: str | Path) -> Iterator[RawSample]:
    """Yield the samples of one shard in tar order.

    Raises :class:`ShardReadError` (after yielding every readable sample) when the tar is
    truncated or corrupt.
    """
    current: RawSample | None = None
    position = 0
    try:
        with open(path, "rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardReadError(f"{path}: member {member.name} is truncated")
                if current is not None and key != current.key:
                    yield current
                    position += 1
                    current = None
                if current is None:
                    current = RawSample(key=key, position=position)
                current.files[ext] = data
            check_end_of_archive(fileobj, tar.offset, path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"{path}: {type(exc).__name__}: {exc}") from exc
    if current is not None:
        yield current


def check_end_of_archive(fileobj: BinaryIO, offset: int, path: str | Path) -> None:
    """Raise :class:`ShardReadError` unless the zero block that ends a tar sits at ``offset``.

    ``tarfile`` silently stops at a truncated or garbled header, so without this check a shard
    cut at (or inside) a member header would read as a shorter, valid shard.
    """
    fileobj.seek(offset)
    if fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise ShardReadError(f"{path}: truncated or corrupt at byte {offset} (no end-of-archive)")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, fully (so corrupt data fails here, not later)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")
