"""A stop signal mid-run: checkpoint at an agreed step, exit 75, resume with identical losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint as ckpt
from pretrain.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "pretrain" / "recipes" / "debug" / "simclr.yaml")
STEPS = 20


def command(nproc: int, shards: Path, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "pretrain"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "pretrain",
        ]
    return [
        *launcher,
        RECIPE,
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"run.total_steps={STEPS}",
        "checkpoint.every=1000",
    ]


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def rank_pid(parent: int, rank: int) -> int:
    """The torchrun worker process with ``RANK=rank`` (a child of the agent)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise LookupError(f"no rank {rank} child of {parent}")


def run_and_signal(cmd: list[str], run_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    """Start ``cmd``; once 3 steps are logged send SIGUSR1 to one rank only (the last)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while logged_steps(run_dir) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    target = proc.pid if nproc == 1 else rank_pid(proc.pid, nproc - 1)
    os.kill(target, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("nproc", [1, 2])
def test_signal_checkpoints_and_resume_is_exact(
    cifar_train_shards: Path, tmp_path: Path, nproc: int
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command(nproc, cifar_train_shards, straight),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    first = run_and_signal(command(nproc, cifar_train_shards, stopped), stopped, nproc)
    if nproc == 1:
        assert first.returncode == 75, first.stderr[-2000:]
    else:  # torchrun's agent reports any non-zero worker exit as its own failure (1)
        assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-2000:]
    saved = [s for s, _ in ckpt.list_checkpoints(stopped)]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS
    assert not (stopped / "export").exists()

    second = subprocess.run(
        command(nproc, cifar_train_shards, stopped),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    losses = [(m["step"], m["loss"]) for m in read_metrics(stopped)]
    assert losses == [(m["step"], m["loss"]) for m in read_metrics(straight)]
    assert (stopped / "export" / "backbone.safetensors").is_file()
