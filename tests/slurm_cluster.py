"""A real single-node Slurm for tests: start it (slurm/local/up.sh) and drive jobs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "slurm" / "local" / "up.sh"
REQUIRED_ENV = "SSLPIPE_REQUIRE_SLURM"  # set by .ci/run: no Slurm is a failure there, not a skip


def slurm_responds() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and bool(re.search(r"idle|mixed|alloc", proc.stdout))


def ensure_slurm() -> None:
    """Use a running Slurm, else start the local one; skip (fail under CI) when impossible."""
    if slurm_responds():
        return
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root to install and start Slurm (make slurm-up)"
    else:
        proc = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not slurm_responds():
            reason = f"slurm/local/up.sh failed: {(proc.stderr or proc.stdout)[-500:]}"
    if reason:
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"Slurm is required here ({REQUIRED_ENV} is set): {reason}")
        pytest.skip(reason)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc


def job_field(job: str, key: str) -> str:
    out = run("scontrol", "show", "job", job).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_until_done(job: str, timeout: float = 600) -> str:
    """Wait for a job to end, releasing it whenever a requeue left it held (Slurm holds a
    requeued job ~2 minutes by default). Released at once, a requeued job can be started on a
    node still cleaning up its previous run and killed ("Job credential revoked"), so it is
    released only after 5 s pending with no job completing. A state counts as final only when
    it is unchanged 5 s later."""
    deadline = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < deadline:
        state = job_field(job, "JobState")
        if state in FINAL_STATES:
            time.sleep(5)
            if job_field(job, "JobState") == state:
                return state
            continue
        if state == "PENDING" and job_field(job, "Reason") == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 5 and not jobs_completing():
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
                held_since = None
        time.sleep(1)
    raise AssertionError(f"job {job} did not end within {timeout} s")


def jobs_completing() -> bool:
    proc = subprocess.run(["squeue", "-h", "-t", "CG"], capture_output=True, text=True, timeout=30)
    return bool(proc.stdout.strip())


def wait_for_steps(run_dir: Path, steps: int, timeout: float = 300) -> None:
    """Wait until ``metrics.jsonl`` of ``run_dir`` has ``steps`` lines."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} did not reach {steps} steps within {timeout} s")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
