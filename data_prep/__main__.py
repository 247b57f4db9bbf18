"""Command line: ``python -m data_prep write SRC OUT`` and ``python -m data_prep verify OUT``.

Exit codes: 0 success; 1 ``verify`` found bad shards or samples; 2 bad input (missing source,
no images, bad CSV rows, output already holds shards, unreadable manifest); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.errors import DataPrepError
from data_prep.verify import verify_shards
from data_prep.writer import WriteOptions, write_shards

EXIT_OK, EXIT_BAD_SHARDS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """A byte count: an integer, optionally with a K/M/G/T suffix (decimal; ``B`` optional)."""
    clean = text.strip().lower().removesuffix("b").replace("_", "")
    number, suffix = (clean[:-1], clean[-1]) if clean[-1:].isalpha() else (clean, "")
    try:
        value = int(float(number) * SIZE_SUFFIXES[suffix])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 500M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_write_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "write",
        help="write images from SRC into tar shards in OUT",
        description=(
            "Write the images of SRC into WebDataset tar shards OUT/shard-NNNNNN.tar and "
            "OUT/manifest.json. SRC is (1) a folder of class subfolders (labels = index in the "
            "sorted folder names), (2) any other folder: all images below it, unlabelled, or "
            "(3) a CSV file of 'path[,label]' rows (paths relative to the CSV; an optional "
            "first row starting with 'path' is a header; labels all integers or all class "
            "names). Unreadable images are skipped and listed in the manifest."
        ),
    )
    p.add_argument("src", metavar="SRC", help="image folder or CSV file list")
    p.add_argument("out", metavar="OUT", help="output directory for the shards and manifest")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)"
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=10_000,
        help="maximum samples per shard (default 10000)",
    )
    p.add_argument(
        "--shard-bytes",
        type=parse_size,
        default=1_000_000_000,
        help="maximum bytes per shard file, e.g. 500M or 1G (default 1G); a shard always "
        "holds at least one sample",
    )
    p.add_argument(
        "--max-samples",
        type=positive_int,
        default=None,
        help="keep only the first N samples after the shuffle (default: all)",
    )
    p.add_argument(
        "--resize-max",
        type=positive_int,
        default=None,
        metavar="PX",
        help="re-encode images whose longer side exceeds PX to exactly PX (aspect kept, "
        "JPEG quality 95); smaller images keep their original bytes (default: never resize)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes reading and checking images; the output is identical for any "
        "value (default 1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing shard set in OUT (its shard-*.tar and manifest.json)",
    )
    p.set_defaults(run=run_write)


def add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check the shards in OUT against their manifest",
        description=(
            "Check every shard listed in OUT/manifest.json: existence, byte size, sha256, that "
            "the tar reads to its end, that every image decodes and every label parses and is "
            "in range, and the sample counts. Exit 0 if all is well, 1 naming each bad shard "
            "and sample otherwise."
        ),
    )
    p.add_argument("out", metavar="OUT", help="shard directory written by 'write'")
    p.add_argument(
        "--workers", type=positive_int, default=1, help="shards checked in parallel (default 1)"
    )
    p.set_defaults(run=run_verify)


def build_parser() -> argparse.ArgumentParser:
    """The ``data_prep`` argument parser with its ``write`` and ``verify`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn image folders or file lists into verified WebDataset tar shards.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log per-shard progress (INFO level)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_write_parser(subparsers)
    add_verify_parser(subparsers)
    return parser


def run_write(args: argparse.Namespace) -> int:
    """Write shards, then print a one-line summary."""
    options = WriteOptions(
        seed=args.seed,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        resize_max=args.resize_max,
        max_samples=args.max_samples,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    result = write_shards(args.src, args.out, options)
    m = result.manifest
    print(
        f"wrote {m.num_samples} samples in {m.num_shards} shards to {args.out}, "
        f"skipped {len(m.skipped)}, {result.seconds:.1f} s"
    )
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    """Verify shards; print each problem and a summary."""
    report = verify_shards(args.out, workers=args.workers)
    for problem in report.problems:
        print(f"BAD {problem}")
    summary = f"{report.num_shards} shards, {report.samples_ok}/{report.num_samples} samples OK"
    if report.ok:
        print(f"OK: {summary}")
        return EXIT_OK
    print(f"FAILED: {summary}; bad shards: {', '.join(report.bad_shards)}")
    return EXIT_BAD_SHARDS


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, set up logging, run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
