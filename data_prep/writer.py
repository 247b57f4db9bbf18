"""Writing a source's images into reproducible WebDataset tar shards plus ``manifest.json``.

Samples are shuffled with a seed before sharding, read and checked in worker processes (in order,
so the output does not depend on the worker count), and written as tar members with fixed
metadata, so the same source and options always give byte-identical shards.

Each sample ``i`` (counting written samples, contiguous across shards) is stored as members
``{i:09d}.{ext}`` (original bytes unless resized), ``{i:09d}.cls`` (ASCII integer, labelled
sources only) and ``{i:09d}.json`` (``{"path", "label", "class"}``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.encode import encode_task
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST_NAME, Manifest, ShardInfo
from data_prep.sources import SourceSample, image_ext, list_source

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
TMP_GLOB = ".shard-*.tar.tmp"


@dataclass
class WriteOptions:
    """Options of ``python -m data_prep write`` (see its ``--help``)."""

    seed: int = 0
    shard_size: int = 10_000
    shard_bytes: int = 1_000_000_000
    resize_max: int | None = None
    max_samples: int | None = None
    workers: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("shard_size", "shard_bytes", "resize_max", "max_samples", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataPrepError(f"{name} must be at least 1, got {value}")

    def manifest_options(self) -> dict:
        """The options that determine the shard contents (recorded in the manifest)."""
        keys = ("seed", "shard_size", "shard_bytes", "resize_max", "max_samples")
        return {k: getattr(self, k) for k in keys}


@dataclass
class WriteResult:
    """What a write produced, and how long it took."""

    manifest: Manifest
    seconds: float


def write_shards(
    src: str | os.PathLike, out: str | os.PathLike, options: WriteOptions
) -> WriteResult:
    """List ``src``, shuffle, check and encode every image, and write shards and manifest to ``out``."""
    start = time.perf_counter()
    listing = list_source(src)
    out_dir = Path(out)
    prepare_output_dir(out_dir, options.overwrite)
    samples = shuffled_samples(listing.samples, options.seed, options.max_samples)
    skipped: list[dict] = []
    sink = ShardSink(out_dir, options.shard_size, options.shard_bytes)
    try:
        for sample, result in encode_samples(samples, options.resize_max, options.workers):
            if result[0] == "error":
                log.warning("skipping unreadable image %s: %s", sample.file, result[1])
                skipped.append({"path": sample.path, "error": result[1]})
                continue
            sink.add(sample_members(sink.count_written, sample, result[1], result[2]))
        shards = sink.finish()
    except BaseException:
        sink.abort()
        raise
    if not shards:
        raise DataPrepError(f"none of the {len(samples)} source images could be read")
    manifest = Manifest(
        shards=shards,
        classes=listing.classes,
        source=str(Path(src).resolve()),
        source_kind=listing.kind,
        skipped=skipped,
        options=options.manifest_options(),
    )
    manifest.save(out_dir)
    return WriteResult(manifest=manifest, seconds=time.perf_counter() - start)


def shuffled_samples(
    samples: list[SourceSample], seed: int, max_samples: int | None
) -> list[SourceSample]:
    """A seeded shuffle of ``samples``, cut to the first ``max_samples``."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    return order[:max_samples] if max_samples is not None else order


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse if it holds a shard set, or clear it when ``overwrite`` is set."""
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    old_shards = sorted(out.glob(SHARD_GLOB))
    if not overwrite and manifest.exists():
        raise DataPrepError(f"{out} already holds a shard set ({manifest}); pass --overwrite")
    if not overwrite and old_shards:
        raise DataPrepError(f"{out} holds shard files without a manifest; pass --overwrite")
    if overwrite:
        manifest.unlink(missing_ok=True)  # first, so a crash never leaves a dangling manifest
        for path in [*old_shards, *out.glob(TMP_GLOB)]:
            path.unlink()
        log.info("removed the old shard set in %s (%d shards)", out, len(old_shards))


def encode_samples(
    samples: list[SourceSample], resize_max: int | None, workers: int
) -> Iterator[tuple[SourceSample, tuple]]:
    """``(sample, encode_task result)`` for every sample, in order, using ``workers`` processes."""
    tasks = [(s.file, image_ext(s.file) or "") for s in samples]
    encode = functools.partial(encode_task, resize_max=resize_max)
    if workers == 1:
        yield from zip(samples, map(encode, tasks), strict=True)
        return
    chunksize = max(1, min(256, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        yield from zip(samples, pool.imap(encode, tasks, chunksize=chunksize), strict=True)


def sample_members(
    index: int, sample: SourceSample, ext: str, data: bytes
) -> list[tuple[str, bytes]]:
    """The tar members ``(name, bytes)`` of written sample number ``index``."""
    key = f"{index:09d}"
    members = [(f"{key}.{ext}", data)]
    if sample.label is not None:
        members.append((f"{key}.cls", str(sample.label).encode("ascii")))
    meta = {"path": sample.path, "label": sample.label, "class": sample.class_name}
    members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    return members


def member_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed metadata, so shards are byte-for-byte reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a ustar archive: one header block each plus padded data."""
    return sum(tarfile.BLOCKSIZE + round_up(len(data), tarfile.BLOCKSIZE) for _, data in members)


def closed_tar_size(offset: int) -> int:
    """File size of a tar closed at ``offset``: two zero blocks, then padding to a record."""
    return round_up(offset + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


class HashingFile:
    """A write-only file wrapper that keeps a running sha256 and byte count."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardSink:
    """Writes samples into numbered shards, starting a new one at the count or byte limit.

    Each shard is written to a hidden temporary file and renamed when complete.
    """

    def __init__(self, out_dir: Path, shard_size: int, shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.shards: list[ShardInfo] = []
        self.count_written = 0
        self.tar: tarfile.TarFile | None = None
        self.file: io.BufferedWriter | None = None
        self.hashing: HashingFile | None = None
        self.in_shard = 0

    def paths(self) -> tuple[Path, Path]:
        """(temporary, final) path of the shard being written."""
        name = SHARD_PATTERN.format(len(self.shards))
        return self.out_dir / f".{name}.tmp", self.out_dir / name

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's members, closing the current shard first if they would not fit."""
        if self.tar is not None and not self.fits(members):
            self.close_shard()
        if self.tar is None:
            self.open_shard()
        for name, data in members:
            self.tar.addfile(member_tarinfo(name, len(data)), io.BytesIO(data))
        self.in_shard += 1
        self.count_written += 1

    def fits(self, members: list[tuple[str, bytes]]) -> bool:
        """Whether the sample fits the open shard's sample-count and byte limits."""
        if self.in_shard >= self.shard_size:
            return False
        return closed_tar_size(self.tar.offset + tar_bytes(members)) <= self.shard_bytes

    def open_shard(self) -> None:
        tmp, _ = self.paths()
        self.file = open(tmp, "wb")  # noqa: SIM115 - closed in close_shard or abort
        self.hashing = HashingFile(self.file)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.in_shard = 0

    def close_shard(self) -> None:
        """Finish the open shard, rename it into place and record its ShardInfo."""
        tmp, final = self.paths()
        self.tar.close()
        self.file.close()
        os.replace(tmp, final)
        info = ShardInfo(
            name=final.name,
            num_samples=self.in_shard,
            sha256=self.hashing.sha256.hexdigest(),
            bytes=self.hashing.size,
        )
        self.shards.append(info)
        self.tar = self.file = self.hashing = None
        log.info("wrote %s: %d samples, %d bytes", info.name, info.num_samples, info.bytes)

    def finish(self) -> list[ShardInfo]:
        """Close the last shard; the list of every shard written."""
        if self.tar is not None:
            self.close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the partial shard after an error (completed shards stay; no manifest is written)."""
        if self.file is not None:
            self.file.close()
            self.paths()[0].unlink(missing_ok=True)
        self.tar = self.file = self.hashing = None
