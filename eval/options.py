"""The options the ``python -m eval`` subcommands share, and argparse value types."""

from __future__ import annotations

import argparse

from eval.load import add_backbone_args

DATA_HELP = "a shard directory (with manifest.json) or an image folder with one subfolder per class"


def number(kind: type, minimum: float, strict: bool = False):
    """An argparse type: ``kind(text)``, at least (or, if ``strict``, above) ``minimum``."""

    def parse(text: str):
        value = kind(text)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 and < 1")
    return value


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every protocol shares: what to evaluate, on which data, where results go."""
    add_backbone_args(p)  # --backbone PATH [--arch NAME]
    add = p.add_argument
    # fmt: off
    add("--train", required=True, metavar="DATA", help=f"labelled train data: {DATA_HELP}")
    add("--test", required=True, metavar="DATA", help=f"labelled test data: {DATA_HELP}")
    add("--image-size", type=number(int, 1), default=None, metavar="PX",
        help="input resolution: resize the shorter side (to PX, or PX/0.875 above 64 px), then "
        "center-crop PX (default: the export's training size, else 32)")
    add("--batch-size", type=number(int, 1), default=256, metavar="N",
        help="images per forward pass and process (default: 256)")
    add("--num-workers", type=number(int, 0), default=2, metavar="N",
        help="data loading worker processes per process (default: 2)")
    add("--max-train", type=number(int, 1), default=None, metavar="N",
        help="use only the first N train samples by global index (default: all)")
    add("--max-test", type=number(int, 1), default=None, metavar="N",
        help="use only the first N test samples by global index (default: all)")
    # fmt: on
    add_input_output_args(p)


def add_input_output_args(p: argparse.ArgumentParser) -> None:
    """Normalisation, results file, random-init baseline, device: shared by every protocol."""
    add = p.add_argument
    # fmt: off
    add("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="normalisation mean, 0-1 units (default: the export's training mean, else "
        "ImageNet's)")
    add("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="normalisation std (default: the export's training std, else ImageNet's)")
    add("--results", default="results.jsonl", metavar="PATH",
        help="JSON-lines file each result is appended to (default: results.jsonl)")
    add("--random-init-baseline", action="store_true",
        help="also evaluate the same architecture at random initialisation (torch.manual_seed(0))")
    add("--device", default="auto",
        help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ... (default: auto)")
    # fmt: on
