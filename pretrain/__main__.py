"""``python -m pretrain RECIPE.yaml [key.sub=value ...]``: train, resuming by itself."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pretrain.logging_setup import setup_logging

EPILOG = """\
examples:
  python -m pretrain pretrain/recipes/debug/simclr.yaml data.train=shards/train
  python -m pretrain pretrain/recipes/simclr_resnet18_cifar10.yaml run.dir=runs/c10 run.stop_after=500
  torchrun --nproc_per_node 2 -m pretrain RECIPE.yaml run.global_batch_size=512
  python -m pretrain RECIPE.yaml --print-config

The run resumes from the newest complete checkpoint in run.dir when one exists.
SIGUSR1, SIGUSR2 or SIGTERM: every rank stops after the same step, one checkpoint is saved, and the
process exits with status 75 (start the same command again to resume).
Keys every launcher relies on: run.dir run.seed run.total_steps run.stop_after
run.global_batch_size data.train data.num_workers checkpoint.every checkpoint.keep log.every
method.name backbone.name engine.name
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Self-supervised pretraining from WebDataset shards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML (sets only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied last")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--print-run-dir",
        action="store_true",
        help="print the resolved run.dir as an absolute path and exit (for launch scripts)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export the backbone of the newest checkpoint in run.dir to run.dir/export and exit",
    )
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    from pretrain.config import ConfigError, config_to_yaml, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.print_run_dir:
        from pathlib import Path

        print(Path(cfg.run.dir).resolve())
        return 0
    from pretrain.preemption import EXIT_REQUEUE
    from pretrain.train import export_only, preflight, train

    try:
        if args.export_only:
            print(f"exported: {export_only(cfg)}")
            return 0
        preflight(cfg)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    result = train(cfg)
    if result.export_dir is not None:
        print(f"exported: {result.export_dir}")
    status = EXIT_REQUEUE if result.stopped_by_signal else 0
    if status == EXIT_REQUEUE:
        ignore_termination_while_leaving()
    from pretrain.dist import shutdown

    shutdown()
    logging.shutdown()
    return status


def ignore_termination_while_leaving() -> None:
    """Ignore SIGTERM from here on: this rank has saved its checkpoint and is exiting with
    EXIT_REQUEUE. The ranks of a job leave a moment apart, and ``srun --kill-on-bad-exit`` (or
    torchrun's agent) answers the first rank's non-zero status by SIGTERMing the others; a rank
    killed during its own teardown then reports "Terminated" instead of 75 and the job is not
    requeued (seen once in CI's Slurm preemption test)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
