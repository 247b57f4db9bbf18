"""Submit pretraining or evaluation to Slurm through submitit.

    python slurm/submit.py --profile slurm/profiles/NAME.yaml --nodes N --gpus-per-node G \\
        [--tasks-per-node T] [--wait] [--dry-run] -- pretrain RECIPE.yaml [a.b=c ...]
    python slurm/submit.py --profile ... --each CHECKPOINTS.txt -- eval knn --train ... --test ...

The profile (YAML) holds what is specific to a cluster: partition, account, qos, constraint,
time, CPUs and memory per task, environment set-up lines, requeue limit. Recipes hold none of it.

Pretraining runs one task per GPU (``--tasks-per-node`` defaults to ``--gpus-per-node``, or 1
without GPUs) in one process group. Slurm sends SIGUSR2 ``signal_delay_s`` before the time
limit (SIGTERM on preemption): every rank stops after the same step, one checkpoint is saved,
and the job is requeued through submitit's checkpoint hook; the requeued job resumes from the
newest checkpoint of ``run.dir``. ``--each FILE`` turns an eval command into a job array, one
task per line of FILE (passed as ``--backbone LINE``), all appending to one results file.
``-- eval batch ...`` becomes a job array of one ``eval PROTOCOL --backbone CKPT ...`` task per
(checkpoint, protocol) pair not yet in its results file (``eval/batch.py``); rerun ``eval batch``
afterwards to render the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the repo's packages
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from pretrain.typed_config import ConfigError, build  # noqa: E402

log = logging.getLogger("slurm.submit")

EXIT_REQUEUE = 75  # pretrain's exit status after a signal-triggered checkpoint


@dataclass
class Profile:
    """A cluster profile. ``time_min``: wall-clock limit per job start (minutes);
    ``mem_per_task_gb``: memory per task; ``setup``: shell lines run before the tasks start
    (module loads, ``source venv/bin/activate``); ``additional``: any other sbatch options
    (``{"exclusive": true}``); ``max_requeues``: preemption/time-limit requeues allowed."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    mem_per_task_gb: float | None = None
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 20
    log_dir: str = "slurm-logs"
    additional: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.time_min < 1:
            raise ValueError(f"time_min: must be >= 1, got {self.time_min}")
        if self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task: must be >= 1, got {self.cpus_per_task}")


def load_profile(path: str | os.PathLike) -> Profile:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping of keys to values")
    try:
        return build(Profile, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


class SlurmCommand:
    """What each task runs: ``python -m pretrain ...`` or ``python -m eval ...`` in-process.

    Implements submitit's checkpoint protocol: ``checkpoint()`` returns the same command, so a
    requeued job runs it again and pretraining resumes from its newest checkpoint.
    """

    def __init__(self, argv: list[str], max_requeues: int):
        self.argv = list(argv)
        self.max_requeues = max_requeues

    def __call__(self) -> int:
        logging.basicConfig(level=logging.INFO)
        use_task_cpus()
        program, args = self.argv[0], self.argv[1:]
        if program == "eval":
            from eval.__main__ import main as eval_main

            return _checked(eval_main(args), "eval")
        from pretrain.__main__ import main as pretrain_main

        status = pretrain_main(args)
        if status == EXIT_REQUEUE:
            self.requeue()
        return _checked(status, "pretrain")

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 when it requeues the job: run the same command again."""
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmCommand(self.argv, self.max_requeues))

    def requeue(self) -> None:
        """After pretraining saved a checkpoint on a stop signal: rank 0 hands the signal to
        submitit's handler (which calls :meth:`checkpoint`, requeues and exits); the other ranks
        wait for the requeue to end them."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            raise RuntimeError(
                f"stopped by a signal after {restarts} requeues (profile max_requeues); resubmit"
                " the same command to continue from the newest checkpoint"
            )
        if int(os.environ.get("SLURM_PROCID", "0")) == 0:
            os.kill(os.getpid(), signal.Signals[f"SIG{submitit_signal()}"])
        # The requeue ends every task with SIGTERM, which submitit ignores: leave at once then
        # (no result file: the job is not over) instead of waiting for Slurm's SIGKILL.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        time.sleep(3600)


def use_task_cpus() -> None:
    """One intra-op thread per CPU of the task, as ``slurm/pretrain.sbatch`` sets it (the
    thread count changes float reduction order, so both launchers give the same numbers)."""
    import torch

    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_task(task: SlurmCommand) -> int:
    """One array task (``map_array`` calls a function with each item)."""
    return task()


def _checked(status: int, what: str) -> int:
    if status != 0:
        raise RuntimeError(f"{what} exited with status {status}")
    return status


def submitit_signal() -> str:
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment.USR_SIG


def slurm_parameters(profile: Profile, args: argparse.Namespace, job_name: str) -> dict[str, Any]:
    """The SlurmExecutor parameters (sbatch options) for this submission."""
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": profile.cpus_per_task,
        "time": profile.time_min,
        "signal_delay_s": profile.signal_delay_s,
        "setup": list(profile.setup),
        "additional_parameters": {"open-mode": "append", "requeue": True, **profile.additional},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if profile.mem_per_task_gb is not None:
        params["mem"] = f"{int(profile.mem_per_task_gb * tasks * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key) is not None:
            params[key] = getattr(profile, key)
    return params


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("slurm/submit.py: put the command after '--' (-- pretrain RECIPE ...)")
    split = argv.index("--")
    p = argparse.ArgumentParser(
        prog="python slurm/submit.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", required=True, help="cluster profile YAML (slurm/profiles/)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: 0)")
    p.add_argument(
        "--tasks-per-node", type=int, help="tasks per node (default: GPUs per node, else 1)"
    )
    p.add_argument("--name", help="job name (default: sslpipe-<command>)")
    p.add_argument("--each", help="eval only: one array task per line of this file (--backbone)")
    p.add_argument(
        "--wait", action="store_true", help="block until the job ends; exit with its status"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and command; submit nothing"
    )
    args = p.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command or command[0] not in ("pretrain", "eval"):
        p.error("the command after '--' must start with 'pretrain' or 'eval'")
    if args.each and command[0] != "eval":
        p.error("--each makes an array of eval tasks; the command must start with 'eval'")
    if args.each and is_batch(command):
        p.error("--each does not combine with 'eval batch' (it names its own --checkpoints)")
    return args, command


def is_batch(command: list[str]) -> bool:
    """``eval batch ...``: submitted as one array task per missing (checkpoint, protocol)."""
    return command[:2] == ["eval", "batch"]


def batch_commands(command: list[str]) -> list[list[str]]:
    """The ``eval PROTOCOL --backbone CKPT ...`` commands of the pairs not yet done."""
    from eval.batch import missing_commands

    return missing_commands(command[2:])


def run_dir_of(command: list[str]) -> Path | None:
    """The resolved ``run.dir`` of a pretrain command (checked before submitting)."""
    if command[0] != "pretrain":
        return None
    from pretrain.__main__ import parse_args as pretrain_args
    from pretrain.config import load_config

    ns = pretrain_args(command[1:])
    return Path(load_config(ns.recipe, ns.overrides).run.dir).resolve()


def array_commands(command: list[str], each: str) -> list[list[str]]:
    lines = [ln.strip() for ln in Path(each).read_text().splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"slurm/submit.py: {each} lists no checkpoints")
    return [[*command, "--backbone", line] for line in lines]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        profile = load_profile(args.profile)
        run_dir = run_dir_of(command)
        if is_batch(command):
            commands = batch_commands(command)
        elif args.each:
            commands = array_commands(command, args.each)
        else:
            commands = [command]
    except (ConfigError, ValueError, FileNotFoundError) as exc:  # EvalInputError is a ValueError
        print(f"slurm/submit.py: {exc}", file=sys.stderr)
        return 2
    if not commands:
        print("nothing to submit: every (checkpoint, protocol) pair is in the results file")
        return 0
    name = args.name or f"sslpipe-{command[0]}"
    params = slurm_parameters(profile, args, name)
    if args.dry_run:
        print_dry_run(profile, params, commands, run_dir)
        return 0
    import submitit

    executor = submitit.SlurmExecutor(folder=Path(profile.log_dir).resolve() / "%j")
    executor.update_parameters(**params)
    tasks = [SlurmCommand(c, profile.max_requeues) for c in commands]
    array = args.each or is_batch(command)
    jobs = executor.map_array(run_task, tasks) if array else [executor.submit(tasks[0])]
    for job in jobs:
        print(f"job {job.job_id}")
        print(f"  stdout {job.paths.stdout}")
        print(f"  stderr {job.paths.stderr}")
    if run_dir is not None:
        print(f"  run dir {run_dir}")
    if not args.wait:
        return 0
    return wait_for(jobs)


def wait_for(jobs: list) -> int:
    """Block until every job ends; 0 when all succeeded, else 1 (the error is printed)."""
    status = 0
    for job in jobs:
        try:
            job.result()
            print(f"job {job.job_id}: done")
        except Exception as exc:  # submitit re-raises the task's failure here
            print(f"job {job.job_id}: failed: {exc}", file=sys.stderr)
            status = 1
    return status


def print_dry_run(profile: Profile, params: dict, commands: list[list[str]], run_dir) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    script_params = dict(params)
    if len(commands) > 1:
        script_params["map_count"] = len(commands)
    script = _make_sbatch_string(
        command="<python -m submitit.core._submit LOG_DIR>",
        folder=str(Path(profile.log_dir).resolve() / "%j"),
        **script_params,
    )
    print(script)
    for c in commands:
        print("# command:", shlex.join(["python", "-m", *c]))
    if run_dir is not None:
        print(f"# run dir: {run_dir}")
    print("# parameters:", yaml.safe_dump(params, sort_keys=True).rstrip().replace("\n", "\n#   "))


if __name__ == "__main__":
    sys.exit(main())
