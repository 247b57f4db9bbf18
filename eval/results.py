"""Eval results: one JSON object per (checkpoint, protocol, dataset), appended to a JSONL file.

Record (contract, see DESIGN.md "Eval results")::

    {"checkpoint": str, "sha256": str, "protocol": str, "dataset": str,
     "metrics": {"top1": float, "top5": float}, "config": {...}, "seconds": float,
     "versions": {"torch": ..., "torchvision": ..., "timm": ..., "python": ...}}
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision

RECORD_KEYS = (
    "checkpoint",
    "sha256",
    "protocol",
    "dataset",
    "metrics",
    "config",
    "seconds",
    "versions",
)


def versions() -> dict[str, str]:
    """Library versions that a result depends on."""
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def dataset_name(path: str | os.PathLike) -> str:
    """``/data/cifar10/test -> "cifar10/test"``: the data directory and its parent's name."""
    return short_path(Path(path).resolve())


def append_result(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if needed), flushed and fsynced."""
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"result record lacks {missing}")
    line = json.dumps(record, sort_keys=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # array tasks append to one file concurrently
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a results file, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def short_path(path: str | os.PathLike) -> str:
    """``/runs/dino-r18/export -> "dino-r18/export"``: the last two components of a path."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else str(p)


def record_label(record: dict[str, Any]) -> str:
    """The table name of a record's checkpoint, ``" (random init)"`` added for the baseline."""
    random = record.get("config", {}).get("init") == "random"
    return short_path(record["checkpoint"]) + (" (random init)" if random else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """An aligned markdown table; the first ``text_columns`` columns left-aligned, the others
    (numbers) right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = [i >= text_columns for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = zip(row, widths, numeric, strict=True)
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in cells) + " |"

    rule = "|".join(
        "-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, numeric, strict=True)
    )
    return "\n".join([fmt(table[0]), f"|{rule}|"] + [fmt(r) for r in table[1:]])


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """``checkpoint | protocol | top1 | top5 | seconds`` (``AP | AP50`` instead when every
    record is a detection result)."""
    detection = bool(records) and all("AP" in r["metrics"] for r in records)
    keys = ("AP", "AP50") if detection else ("top1", "top5")
    rows = [
        [
            record_label(r),
            r["protocol"],
            *(f"{r['metrics'].get(k, float('nan')):.2f}" for k in keys),
            f"{r['seconds']:.1f}",
        ]
        for r in records
    ]
    return markdown_table(["checkpoint", "protocol", *keys, "seconds"], rows, text_columns=2)
