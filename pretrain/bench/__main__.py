"""``python -m pretrain.bench RECIPE [a.b=c ...] [--steps N] [--warmup N] [--split-steps N]
[--inputs LIST] [--json PATH]``: the command line of :mod:`pretrain.bench.measure` (table and JSON report)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain.bench.measure import BenchOptions, bench, mode_config
from pretrain.logging_setup import setup_logging

INPUTS = ("synthetic", "workers", "device", "shards")

EPILOG = """\
input modes (--inputs, comma-separated, run in the order given):
  synthetic  random views of the recipe's exact shapes (from its view kind and data.aug),
             created once on the device; no loader, no decoding: the model's ceiling
  workers    the real shards (data.train) through the CPU pipeline (data.pipeline=workers:
             PIL decode + torchvision augmentation in data.num_workers loader workers)
  device     the real shards through the device pipeline (data.pipeline=device: workers read
             bytes and draw parameters; batched decode + augmentation on the training device)
  shards     the real shards with the recipe's own data.pipeline (auto = device on CUDA)

timing: the --steps timed steps run as in training, with no device synchronisation between
steps (on the device pipeline the next batch's decode and augmentation overlap the current
step): img/s, step ms and data-wait % (the host's time blocked waiting for the next views) come
from them. Then --split-steps synchronised steps time the data part (batch, decode, augment)
and the model's step apart: data ms and compute ms; MFU uses compute ms.

output: an aligned table (mode, img/s, step ms, data-wait %, data ms, compute ms, MFU %, peak
memory GB) on stdout; with --json PATH the full report goes to PATH (its path is printed under
the table), without it the report is printed as JSON on stdout after the table. Report keys,
per mode: input, pipeline, steps, global_batch, images_per_s, step_s, data_wait_s,
data_wait_frac, split_steps, data_s, compute_s, flops_per_step, achieved_tflops, peak_tflops,
mfu, peak_memory_gb (null where not measurable, with the reason in notes); top level: recipe,
overrides, device, precision, torch, world_size, warmup, results, notes. flops_per_step and the
TFLOP/s figures are per device.

examples:
  python -m pretrain.bench pretrain/recipes/dino_vit_small_in1k.yaml --inputs synthetic
  python -m pretrain.bench RECIPE.yaml data.train=shards/in1k data.num_workers=10 \\
      --inputs synthetic,workers,device --steps 50 --json bench.json
  torchrun --nproc_per_node 8 -m pretrain.bench RECIPE.yaml data.train=shards/in1k

Under torchrun the global batch is split as in training and only rank 0 prints and writes;
timings are rank 0's. A bad recipe or override exits 2 with one line, as the trainer does.
"""


def parse_inputs(text: str) -> list[str]:
    """``"synthetic,shards"`` → ``["synthetic", "shards"]`` (an argparse ``type``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in INPUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{','.join(bad) or repr(text)}: choose from {', '.join(INPUTS)}"
        )
    return list(dict.fromkeys(names))


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an int no smaller than ``minimum``."""

    def check(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return check


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.bench",
        description="Training throughput of a recipe (img/s, data wait, MFU, peak memory) per\n"
        "input mode, with the trainer's own build_run and train_step.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML, as for python -m pretrain")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied last")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed steps per mode (20)")
    p.add_argument(
        "--warmup",
        type=at_least(0),
        default=5,
        help="untimed steps first: compile, kernel selection, loader workers start (5)",
    )
    p.add_argument(
        "--split-steps",
        type=at_least(1),
        default=5,
        help="synchronised steps after the timed ones, timing data and compute apart (5)",
    )
    p.add_argument(
        "--inputs",
        type=parse_inputs,
        default=["synthetic", "shards"],
        help=f"comma-separated input modes from {','.join(INPUTS)} (synthetic,shards); see below",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write the JSON report to PATH (else it is printed on stdout after the table)",
    )
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    from pretrain.config import load_config

    options = BenchOptions(args.steps, args.warmup, args.inputs, args.split_steps)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        try:  # every check before any work: the trainer's config errors and preflight
            cfg = load_config(args.recipe, args.overrides)
            configs = {m: mode_config(cfg, m, options, Path(tmp)) for m in options.inputs}
        except ValueError as exc:  # ConfigError included
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        report = bench(configs, options, notes)
    from pretrain.dist import shutdown

    shutdown()
    if report["rank"] == 0:
        del report["rank"]
        emit({"recipe": str(args.recipe), "overrides": args.overrides} | report, args.json)
    return 0


def table(results: list[dict[str, Any]]) -> str:
    """The aligned summary: mode, img/s, step ms, data-wait %, data ms, compute ms, MFU %,
    peak memory GB."""
    header = (
        "mode", "img/s", "step ms", "data-wait %", "data ms", "compute ms", "MFU %", "peak mem GB"
    )  # fmt: skip
    rows = [header] + [table_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(lines)


def table_row(r: dict[str, Any]) -> tuple[str, ...]:
    name = r["input"] if r["pipeline"] is None else f"{r['input']} ({r['pipeline']})"
    return (
        name,
        f"{r['images_per_s']:.1f}",
        f"{1000 * r['step_s']:.1f}",
        f"{100 * r['data_wait_frac']:.1f}",
        f"{1000 * r['data_s']:.1f}",
        f"{1000 * r['compute_s']:.1f}",
        "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}",
        "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}",
    )


def emit(report: dict[str, Any], json_path: str | None) -> None:
    """Table on stdout; the JSON to ``json_path`` (its path printed) or on stdout."""
    print(table(report["results"]))
    text = json.dumps(report, indent=1)
    if json_path is None:
        print(text)
        return
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"json: {path}")


if __name__ == "__main__":
    sys.exit(main())
