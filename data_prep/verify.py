"""Checking a shard directory against its manifest, down to decoding every image.

Per shard: the file exists, its size and sha256 match the manifest, the tar reads to its end,
every sample has an image member that decodes, a ``cls`` member that parses (required when the
manifest has ``classes``, and then in range), a key equal to its global index, and the sample
count matches. Every problem found is reported, not just the first.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.manifest import Manifest, ShardInfo
from data_prep.reader import RawSample, ShardReadError, decode_image, iter_tar_samples

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong: in a whole shard (``key`` is ``None``) or in one of its samples."""

    shard: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        where = self.shard if self.key is None else f"{self.shard} {self.key}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to check one shard (plain values, so it pickles cheaply)."""

    path: str
    info: ShardInfo
    offset: int
    num_classes: int | None


@dataclass
class ShardReport:
    """The outcome of checking one shard."""

    shard: str
    samples_ok: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    """The outcome of checking a whole shard directory."""

    num_shards: int
    num_samples: int
    samples_ok: int
    problems: list[Problem]
    bad_shards: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(directory: str | os.PathLike, workers: int = 1) -> VerifyReport:
    """Check every shard listed in ``directory/manifest.json``; see the module docstring."""
    manifest = load_manifest(directory)
    num_classes = len(manifest.classes) if manifest.classes is not None else None
    tasks = [
        ShardTask(str(Path(directory) / info.name), info, offset, num_classes)
        for info, offset in zip(manifest.shards, manifest.shard_offsets(), strict=True)
    ]
    reports = list(map_in_order(check_shard, tasks, workers))
    problems = [p for r in reports for p in r.problems]
    return VerifyReport(
        num_shards=manifest.num_shards,
        num_samples=manifest.num_samples,
        samples_ok=sum(r.samples_ok for r in reports),
        problems=problems,
        bad_shards=[r.shard for r in reports if r.problems],
    )


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of ``directory``; :class:`DataPrepError` if it is missing or malformed."""
    try:
        return Manifest.load(directory)
    except FileNotFoundError as exc:
        raise DataPrepError(str(exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DataPrepError(f"{directory}: malformed manifest.json: {exc}") from exc


def map_in_order(
    func: Callable[[ShardTask], ShardReport], items: list[ShardTask], workers: int
) -> Iterator[ShardReport]:
    """``map(func, items)``, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(items) <= 1:
        yield from map(func, items)
        return
    with multiprocessing.Pool(min(workers, len(items))) as pool:
        yield from pool.imap(func, items)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(task: ShardTask) -> ShardReport:
    """Check one shard's file (size, sha256) and every sample in it."""
    name = task.info.name
    report = ShardReport(shard=name)
    if not os.path.isfile(task.path):
        report.problems.append(Problem(name, "missing"))
        return report
    report.problems.extend(check_shard_file(task))
    count = 0
    try:
        for sample in iter_tar_samples(task.path):
            count += 1
            sample_problems = check_sample(sample, task)
            report.problems.extend(sample_problems)
            report.samples_ok += not sample_problems
    except ShardReadError as exc:
        report.problems.append(Problem(name, f"truncated/unreadable tar: {exc}"))
    if count != task.info.num_samples:
        reason = f"count mismatch: {count} samples read, manifest says {task.info.num_samples}"
        report.problems.append(Problem(name, reason))
    log.debug(
        "checked %s: %d samples ok, %d problems", name, report.samples_ok, len(report.problems)
    )
    return report


def check_shard_file(task: ShardTask) -> list[Problem]:
    """Size and sha256 of the shard file against the manifest."""
    problems = []
    size = os.path.getsize(task.path)
    if size != task.info.bytes:
        reason = f"size mismatch: {size} bytes, manifest says {task.info.bytes}"
        problems.append(Problem(task.info.name, reason))
    if file_sha256(task.path) != task.info.sha256:
        problems.append(Problem(task.info.name, "sha256 mismatch"))
    return problems


def check_sample(sample: RawSample, task: ShardTask) -> list[Problem]:
    """Problems with one sample: key, image member, decoding, label."""
    shard, key = task.info.name, sample.key
    problems = []
    expected_key = f"{task.offset + sample.position:09d}"
    if key != expected_key:
        problems.append(Problem(shard, f"key out of order, expected {expected_key}", key))
    try:
        _, data = sample.image_bytes()
        decode_image(data)
    except KeyError:
        problems.append(Problem(shard, f"no image member (members: {sorted(sample.files)})", key))
    except Exception as exc:  # any decoder error is a bad member, not a crash
        problems.append(Problem(shard, f"image does not decode: {type(exc).__name__}: {exc}", key))
    label_problem = check_label(sample, task.num_classes)
    if label_problem:
        problems.append(Problem(shard, label_problem, key))
    return problems


def check_label(sample: RawSample, num_classes: int | None) -> str | None:
    """Why the sample's ``cls`` member is wrong, or ``None`` if it is fine."""
    if "cls" not in sample.files:
        return "no cls member (manifest has classes)" if num_classes is not None else None
    try:
        label = sample.label()
    except (ValueError, UnicodeDecodeError):
        return f"cls member is not an integer: {sample.files['cls'][:20]!r}"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return f"label {label} out of range (classes: {num_classes})"
    return None
