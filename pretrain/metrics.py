"""Run metrics: ``metrics.jsonl`` (one object per logged step), TensorBoard scalars, progress lines.

Only rank 0 writes. On resume, entries past the resumed step (logged after the checkpoint by a
run that then died) are dropped, so ``metrics.jsonl`` reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self, run_dir: str | os.PathLike, start_step: int, enabled: bool, tensorboard: bool
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        truncate_after(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{"step": step, **values}``; scalars also go to TensorBoard as ``train/<k>``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class SampleKeyLog:
    """``samples/rank-<r>.jsonl``: ``{"step", "epoch": [...], "index": [...]}`` per step."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, start_step: int):
        self.path = Path(run_dir) / "samples" / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, start_step)

    def log(self, step: int, epochs: list[int], indices: list[int]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epochs, "index": indices}) + "\n")


def read_sample_keys(run_dir: str | os.PathLike) -> list[tuple[int, int]]:
    """Every (epoch, index) trained on, over all ranks' sample logs of ``run_dir``."""
    keys = []
    for path in sorted((Path(run_dir) / "samples").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            keys.extend(zip(rec["epoch"], rec["index"], strict=True))
    return keys


def truncate_after(path: Path, step: int) -> None:
    """Drop lines whose ``step`` is greater than ``step`` (atomic rewrite)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Throughput:
    """Images/s, seconds per step and the share of wall time spent waiting for data, since the
    last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.steps = 0
        self.wait = 0.0

    def add(self, images: int, wait: float) -> None:
        self.images += images
        self.steps += 1
        self.wait += wait

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {
            "img_per_s": self.images / elapsed,
            "step_s": elapsed / max(self.steps, 1),
            "data_wait": self.wait / elapsed,
        }
        self.reset()
        return out
