"""CUDA paths: bf16 autocast and fp16 grad scaling in real training runs (skipped without CUDA)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.metrics import read_metrics
from pretrain.train import train

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "precision"), [("simclr", "bf16"), ("simclr", "fp16"), ("mocov3", "bf16")]
)
def test_cuda_training_is_finite(
    cifar_train_shards: Path, tmp_path: Path, method: str, precision: str
) -> None:
    cfg = load_config(
        RECIPES / f"{method}.yaml",
        [
            f"data.train={cifar_train_shards}",
            f"run.dir={tmp_path}",
            "run.total_steps=8",
            f"engine.precision={precision}",
            "data.num_workers=2",
        ],
    )
    result = train(cfg)
    assert result.finished and result.export_dir is not None
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
