"""Listing the samples of a source: a class-folder tree, an unlabelled folder or a CSV file list.

Source kinds, detected by :func:`list_source`:

``image_folder``
    ``SRC`` holds no images itself, and every (non-hidden) subdirectory holds images directly.
    Each subdirectory is a class; labels are indices into the sorted subdirectory names. Images
    deeper inside a class folder belong to that class.
``unlabelled_folder``
    Any other directory: every image below ``SRC`` (recursively) is a sample without a label.
``file_list``
    ``SRC`` is a CSV file with rows ``path[,label]``. Paths are absolute or relative to the CSV's
    directory. A first row whose first field is ``path`` (any case) is a header and is skipped;
    blank rows are skipped. Labels are either all integers (stored as-is, ``classes`` is null) or
    all class names (``classes`` = sorted unique names, label = index); rows without a label make
    the whole list unlabelled, so either every row has a label or none does.

Image files are recognised by extension (:data:`data_prep.reader.IMAGE_EXTS`, any case); hidden
files and directories (name starting with ``.``) are ignored. Samples are listed in a
deterministic order (sorted relative paths, or CSV row order).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.manifest import is_shard_dir
from data_prep.reader import IMAGE_EXTS

log = logging.getLogger(__name__)

IMAGE_FOLDER = "image_folder"
UNLABELLED_FOLDER = "unlabelled_folder"
FILE_LIST = "file_list"


@dataclass(frozen=True)
class SourceSample:
    """One source image: where to read it, how to name it in the shard, and its label."""

    file: str
    """Path used to open the file (absolute, or as resolved against the CSV's directory)."""
    path: str
    """Path as given: relative to ``SRC`` for folders, the CSV's own text for file lists."""
    label: int | None = None
    class_name: str | None = None


@dataclass
class SourceListing:
    """Every sample of a source, its kind and (for named classes) the sorted class names."""

    kind: str
    samples: list[SourceSample]
    classes: list[str] | None = None


def image_ext(name: str) -> str | None:
    """The lowercase extension of ``name`` if it is an accepted image extension, else ``None``."""
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    return ext if ext in IMAGE_EXTS else None


def is_image_name(name: str) -> bool:
    """True for non-hidden file names with an image extension."""
    return not name.startswith(".") and image_ext(name) is not None


def list_source(src: str | os.PathLike) -> SourceListing:
    """List the samples of ``src`` (folder or CSV), detecting its kind.

    Raises :class:`DataPrepError` when ``src`` is missing, holds no images, is a shard directory,
    or is a CSV with bad rows.
    """
    src_path = Path(src)
    if not src_path.exists():
        raise DataPrepError(f"source {src} does not exist")
    if src_path.is_file():
        listing = list_file_list(src_path)
    elif is_shard_dir(src_path):
        raise DataPrepError(f"source {src} is a shard directory (has manifest.json), not images")
    elif is_class_folder_tree(src_path):
        listing = list_image_folder(src_path)
    else:
        listing = list_unlabelled_folder(src_path)
    if not listing.samples:
        raise DataPrepError(f"source {src} holds no images (extensions: {', '.join(IMAGE_EXTS)})")
    log.info("source %s: %s, %d images", src, listing.kind, len(listing.samples))
    return listing


def visible_entries(directory: Path) -> list[os.DirEntry]:
    """The non-hidden entries of ``directory``, sorted by name."""
    with os.scandir(directory) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def is_class_folder_tree(src: Path) -> bool:
    """No images at the top level, and every subdirectory holds images directly."""
    entries = visible_entries(src)
    if any(e.is_file() and is_image_name(e.name) for e in entries):
        return False
    subdirs = [e for e in entries if e.is_dir()]
    return bool(subdirs) and all(
        any(f.is_file() and is_image_name(f.name) for f in visible_entries(Path(d.path)))
        for d in subdirs
    )


def walk_images(root: Path) -> list[tuple[str, str]]:
    """``(relative posix path, absolute path)`` of every image below absolute ``root``.

    Follows symlinks; sorted by relative path. Plain string handling keeps this fast for
    millions of files.
    """
    found = []
    prefix_len = len(str(root).rstrip(os.sep)) + 1
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = dirpath[prefix_len:].replace(os.sep, "/")
        for name in filenames:
            if is_image_name(name):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                found.append((rel, os.path.join(dirpath, name)))
    return sorted(found)


def list_image_folder(src: Path) -> SourceListing:
    """Samples of a class-folder tree; label = index of the class folder in sorted order."""
    src = src.resolve()
    classes = [e.name for e in visible_entries(src) if e.is_dir()]
    samples = [
        SourceSample(file=file, path=f"{name}/{rel}", label=label, class_name=name)
        for label, name in enumerate(classes)
        for rel, file in walk_images(src / name)
    ]
    return SourceListing(kind=IMAGE_FOLDER, samples=samples, classes=classes)


def list_unlabelled_folder(src: Path) -> SourceListing:
    """Samples of a folder without class structure: every image below it, no labels."""
    samples = [SourceSample(file=file, path=rel) for rel, file in walk_images(src.resolve())]
    return SourceListing(kind=UNLABELLED_FOLDER, samples=samples)


def read_csv_rows(csv_path: Path) -> list[tuple[int, str, str | None]]:
    """``(line number, path, label or None)`` for each data row; header and blank rows dropped."""
    rows = []
    with open(csv_path, newline="") as f:
        for index, row in enumerate(csv.reader(f)):
            line = index + 1
            fields = [field.strip() for field in row]
            if not any(fields):
                continue
            if index == 0 and fields[0].lower() == "path":
                continue
            if len(fields) > 2 or not fields[0]:
                raise DataPrepError(f"{csv_path}:{line}: expected 'path[,label]', got {row!r}")
            label = fields[1] if len(fields) == 2 and fields[1] else None
            rows.append((line, fields[0], label))
    return rows


def parse_int_label(text: str) -> int | None:
    """``text`` as a non-negative integer label, or ``None`` if it is not one."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def check_csv_row(csv_path: Path, line: int, path: str) -> None:
    """Reject rows whose path does not have an image extension."""
    if image_ext(Path(path).name) is None:
        raise DataPrepError(
            f"{csv_path}:{line}: {path!r} is not an image file (extensions: {', '.join(IMAGE_EXTS)})"
        )


def label_scheme(csv_path: Path, rows: list[tuple[int, str, str | None]]) -> str:
    """``"none"``, ``"int"`` or ``"name"``; raises when rows mix labelled/unlabelled or kinds."""
    labelled = [(line, label) for line, _, label in rows if label is not None]
    if not labelled:
        return "none"
    if len(labelled) != len(rows):
        line = next(line for line, _, label in rows if label is None)
        raise DataPrepError(f"{csv_path}:{line}: row has no label but other rows do")
    ints = [parse_int_label(label) is not None for _, label in labelled]
    if all(ints):
        return "int"
    if any(ints):
        line = labelled[ints.index(True)][0]
        raise DataPrepError(
            f"{csv_path}:{line}: integer label mixed with class-name labels in other rows"
        )
    return "name"


def list_file_list(csv_path: Path) -> SourceListing:
    """Samples of a CSV file list ``path[,label]`` (see the module docstring for the rules)."""
    rows = read_csv_rows(csv_path)
    for line, path, _ in rows:
        check_csv_row(csv_path, line, path)
    scheme = label_scheme(csv_path, rows)
    base = csv_path.resolve().parent
    classes = sorted({label for _, _, label in rows}) if scheme == "name" else None
    index = {name: i for i, name in enumerate(classes or [])}
    samples = []
    for _, path, label in rows:
        file = str(base / path)
        if scheme == "int":
            samples.append(SourceSample(file=file, path=path, label=int(label)))
        elif scheme == "name":
            samples.append(SourceSample(file=file, path=path, label=index[label], class_name=label))
        else:
            samples.append(SourceSample(file=file, path=path))
    return SourceListing(kind=FILE_LIST, samples=samples, classes=classes)
