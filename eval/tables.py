"""The tables of ``python -m eval batch``: the batch's records of a results file as markdown
and CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.results import markdown_table, read_results, record_label

if TYPE_CHECKING:
    from eval.batch import Pair

COLUMNS = ("checkpoint", "protocol", "dataset", "top1", "top5", "val_top1", "AP", "AP50",
           "seconds")  # fmt: skip
METRIC_COLUMNS = ("top1", "top5", "val_top1", "AP", "AP50")


def batch_records(results: str | Path, pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """The records of ``results`` that belong to ``pairs``: the newest per (sha256, protocol,
    dataset, init), in the order of the pairs (trained before random init)."""
    order = {key: i for i, key in enumerate(k for p in pairs for k in p.keys)}
    newest: dict[tuple, dict[str, Any]] = {}
    if Path(results).is_file():
        for r in read_results(results):
            key = (r["sha256"], r["protocol"], r["dataset"])
            if key in order:
                newest[(*key, r.get("config", {}).get("init", "trained"))] = r
    return [newest[k] for k in sorted(newest, key=lambda k: (order[k[:3]], k[3] != "trained"))]


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of strings per record (a metric column empty where the protocol has none)."""
    rows = []
    for r in records:
        m = r["metrics"]
        metrics = {c: f"{m[c]:.2f}" if c in m else "" for c in METRIC_COLUMNS}
        names = {"checkpoint": record_label(r), "protocol": r["protocol"], "dataset": r["dataset"]}
        rows.append(names | metrics | {"seconds": f"{r['seconds']:.1f}"})
    return rows


def batch_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :data:`COLUMNS`, metric columns no record has left out."""
    rows = table_rows(records)
    columns = [c for c in COLUMNS if c not in METRIC_COLUMNS or any(row[c] for row in rows)]
    return markdown_table(columns, [[row[c] for c in columns] for row in rows], text_columns=3)


def write_tables(records: Sequence[dict[str, Any]], md: Path, csv_path: Path) -> str:
    """Write the markdown table and the CSV (full checkpoint path and sha256 added); return the
    markdown."""
    text = batch_table(records)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "checkpoint_path", "sha256", "init"])
        for r, row in zip(records, table_rows(records), strict=True):
            init = r.get("config", {}).get("init", "trained")
            writer.writerow([*(row[c] for c in COLUMNS), r["checkpoint"], r["sha256"], init])
    return text
