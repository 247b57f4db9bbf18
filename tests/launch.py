"""Launch the real training CLI under torchrun (gloo, CPU) and read back what a run left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.engine import plain_model_state
from pretrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pretrain" / "recipes" / "debug"


def overrides(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """The overrides every test run shares (checkpoints only at the end unless ``extra`` says)."""
    return [
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"run.total_steps={steps}",
        "checkpoint.every=100",
        *extra,
    ]


def torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m pretrain ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pretrain ARGS`` as one plain process."""
    cmd = [sys.executable, "-m", "pretrain", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def train_cli(recipe: str, *args: str, nproc: int = 2) -> None:
    """Run the CLI and fail with the tail of its stderr when it does not exit 0."""
    proc = torchrun(str(RECIPES / f"{recipe}.yaml"), *args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


def final_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The consolidated ``method.state_dict()`` of the newest checkpoint, whatever the engine."""
    path = ckpt.latest_checkpoint(run_dir)
    assert path is not None, f"no checkpoint in {run_dir}"
    state, _ = ckpt.load_checkpoint(path)
    return plain_model_state(path, ckpt.read_meta(path)["engine"], state)
