"""Against a real single-node Slurm: the sbatch templates, preemption → checkpoint → requeue →
resume with the uninterrupted run's losses, the submitit launcher, and the eval job array."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.dist import DistInfo, detect_launch, expand_nodelist
from tests.launch import RECIPES, losses
from tests.slurm_cluster import (
    REPO,
    ensure_slurm,
    read_jsonl,
    run,
    wait_for_steps,
    wait_until_done,
)

STEPS = 24  # long enough (~0.5 s per step) to signal a run in the middle
SUBMIT = [sys.executable, str(REPO / "slurm" / "submit.py")]


def test_nodelist_expansion() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_nodelist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]


def test_srun_environment_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_NODELIST": "node[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    monkeypatch.setattr(os, "environ", env)  # detect_launch exports the rendezvous variables
    assert detect_launch() == DistInfo(rank=5, local_rank=1, world_size=8, launcher="srun")
    assert env["MASTER_ADDR"] == "node03"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    # The batch script itself (no srun step) stays one plain process.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
    monkeypatch.setattr(os, "environ", batch)
    assert detect_launch() == DistInfo()


@pytest.fixture(scope="module")
def slurm() -> None:
    ensure_slurm()


def pretrain_args(shards: Path, run_dir: Path) -> list[str]:
    return [
        str(RECIPES / "simclr.yaml"),
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"run.total_steps={STEPS}",
        "checkpoint.every=100",
    ]


def sbatch_pretrain(shards: Path, run_dir: Path, out: Path, *extra: str) -> str:
    proc = run(
        "sbatch", "--parsable", "--ntasks=2", f"--output={out}", *extra,
        str(REPO / "slurm" / "pretrain.sbatch"), *pretrain_args(shards, run_dir),
        cwd=REPO, env=job_env(),
    )  # fmt: skip
    return proc.stdout.strip().split(";")[0]


def job_env() -> dict[str, str]:
    """This environment minus any launcher variables, plus the interpreter the jobs use."""
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in launch}, "PY": sys.executable}


@pytest.fixture(scope="module")
def uninterrupted(slurm, cifar_train_shards: Path, tmp_path_factory) -> Path:
    """``sbatch slurm/pretrain.sbatch`` with 2 CPU tasks (gloo) running to the end."""
    root = tmp_path_factory.mktemp("slurm-straight")
    job = sbatch_pretrain(cifar_train_shards, root / "run", root / "job.out")
    assert wait_until_done(job) == "COMPLETED", (root / "job.out").read_text()[-3000:]
    return root


def test_sbatch_template_runs_to_the_end(uninterrupted: Path) -> None:
    out = (uninterrupted / "job.out").read_text()
    assert "2 tasks, run dir" in out and str(uninterrupted / "run") in out
    assert [s for s, _ in losses(uninterrupted / "run")] == list(range(1, STEPS + 1))
    meta = read_jsonl(next((uninterrupted / "run" / "checkpoints").glob("step-*/meta.json")))
    assert meta[0]["world_size"] == 2
    assert (uninterrupted / "run" / "export" / "backbone.safetensors").is_file()
    assert not (uninterrupted / "run" / "slurm_requeues.jsonl").exists()


def test_preemption_checkpoints_requeues_and_resumes_exactly(
    uninterrupted: Path, cifar_train_shards: Path, tmp_path: Path
) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = sbatch_pretrain(cifar_train_shards, run_dir, out)
    wait_for_steps(run_dir, 5)
    run("scancel", "--signal=USR1", job)  # what --signal=USR1@180 delivers to the tasks
    assert wait_until_done(job) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "requeueing job" in text and "resumed from" in text
    stopped_at = int(re.search(r"checkpoint at step (\d+) saved", text).group(1))
    assert 5 <= stopped_at < STEPS
    assert losses(run_dir) == losses(uninterrupted / "run")
    requeues = read_jsonl(run_dir / "slurm_requeues.jsonl")
    assert [(r["job_id"], r["requeue"]) for r in requeues] == [(int(job), 1)]
    assert job_field_restarts(job) == 1


def job_field_restarts(job: str) -> int:
    from tests.slurm_cluster import job_field

    return int(job_field(job, "Restarts"))


def test_submitit_launcher_resumes_after_preemption(
    uninterrupted: Path, cifar_train_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    profile = REPO / "slurm" / "profiles" / "local.yaml"
    proc = run(
        *SUBMIT, "--profile", str(profile), "--tasks-per-node", "2",
        "--", "pretrain", *pretrain_args(cifar_train_shards, run_dir), cwd=tmp_path,
    )  # fmt: skip
    job = re.search(r"^job (\d+)", proc.stdout, re.M).group(1)
    assert f"run dir {run_dir}" in proc.stdout
    logs = tmp_path / "slurm-logs" / job
    assert f"stdout {logs}/{job}_0_log.out" in proc.stdout
    wait_for_steps(run_dir, 5)
    run("scancel", "--signal=USR2", job)  # submitit's time-limit signal, to the tasks
    assert wait_until_done(job) == "COMPLETED", (logs / f"{job}_0_log.err").read_text()[-3000:]
    err = (logs / f"{job}_0_log.err").read_text()
    assert "stop signal (SIGUSR2)" in err and "resumed from" in err
    assert losses(run_dir) == losses(uninterrupted / "run")


def test_dry_run_prints_the_sbatch_script(tmp_path: Path, cifar_train_shards: Path) -> None:
    proc = subprocess.run(
        [*SUBMIT, "--profile", str(REPO / "slurm" / "profiles" / "local.yaml"),
         "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
         "--", "pretrain", *pretrain_args(cifar_train_shards, tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=debug",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@60",
        f"# run dir: {tmp_path / 'run'}",
    ):
        assert line in proc.stdout
    assert "# command: python -m pretrain" in proc.stdout


def test_eval_array_gives_one_result_per_checkpoint(
    uninterrupted: Path, cifar_train_shards: Path, tmp_path: Path
) -> None:
    """Two checkpoints → a 2-task array → two result lines in one file."""
    from safetensors.torch import load_file, save_file

    export = uninterrupted / "run" / "export"
    second = tmp_path / "second"
    second.mkdir()
    (second / "backbone.yaml").write_text((export / "backbone.yaml").read_text())
    weights = load_file(export / "backbone.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, second / "backbone.safetensors")
    listing = tmp_path / "checkpoints.txt"
    listing.write_text(f"{export}\n{second}\n")
    results = tmp_path / "results.jsonl"
    proc = run(
        "sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/eval-%a.out",
        str(REPO / "slurm" / "eval.sbatch"), str(listing),
        "knn", "--train", str(cifar_train_shards), "--test", str(cifar_train_shards),
        "--max-train", "160", "--max-test", "80", "--num-workers", "0", "--device", "cpu",
        "--k", "20",
        "--results", str(results),
        cwd=REPO, env=job_env(),
    )  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    for task in (0, 1):
        assert wait_until_done(f"{job}_{task}") == "COMPLETED"
    records = read_jsonl(results)
    assert sorted(Path(r["checkpoint"]).name for r in records) == ["export", "second"]


def test_submitit_eval_array_waits_for_every_task(
    uninterrupted: Path, cifar_train_shards: Path, tmp_path: Path
) -> None:
    """``--each LIST -- eval ...``: one array task per line; ``--wait`` returns when all end."""
    export = uninterrupted / "run" / "export"
    listing = tmp_path / "checkpoints.txt"
    listing.write_text(f"{export}\n{export}\n")
    results = tmp_path / "results.jsonl"
    proc = run(
        *SUBMIT, "--profile", str(REPO / "slurm" / "profiles" / "local.yaml"),
        "--each", str(listing), "--wait",
        "--", "eval", "knn", "--train", str(cifar_train_shards), "--test", str(cifar_train_shards),
        "--max-train", "160", "--max-test", "80", "--num-workers", "0", "--device", "cpu",
        "--k", "20",
        "--results", str(results),
        cwd=tmp_path,
    )  # fmt: skip
    assert len(re.findall(r"^job \d+_\d+$", proc.stdout, re.M)) == 2
    assert proc.stdout.count(": done") == 2
    assert len(read_jsonl(results)) == 2
