"""``python -m eval knn --backbone PATH [--arch NAME] --train DATA --test DATA ...``: evaluate
frozen backbones (``--backbone``: an export, a training run or checkpoint, or a released checkpoint
file; see ``eval/load.py``).

Every result is one JSON line appended to ``--results`` (see ``eval/results.py``); the run ends
with a small table of this run's results. Input problems (missing path, unlabelled data) exit
with status 2 and a one-line message. Under ``torchrun`` each rank extracts features for its
part of the data; rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eval.features import check_labelled, extract_features
from eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_classify, protocol_name
from eval.load import (
    EvalInputError,
    add_backbone_args,
    checkpoint_path,
    export_spec,
    load_backbone,
    random_init_like,
    weights_sha256,
)
from eval.results import append_result, dataset_name, format_table, versions
from pretrain.backbones import Backbone
from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD
from pretrain.dist import init_distributed, pick_device

log = logging.getLogger("eval")

DATA_HELP = "a shard directory (with manifest.json) or an image folder with one subfolder per class"


def _number(kind: type, minimum: float, strict: bool = False):
    """An argparse type: ``kind(text)``, at least (or, if ``strict``, above) ``minimum``."""

    def parse(text: str):
        value = kind(text)
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum}")
        return value

    return parse


def _add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every protocol shares: what to evaluate, on which data, where results go."""
    add_backbone_args(p)  # --backbone PATH [--arch NAME]
    add = p.add_argument
    # fmt: off
    add("--train", required=True, metavar="DATA", help=f"labelled train data: {DATA_HELP}")
    add("--test", required=True, metavar="DATA", help=f"labelled test data: {DATA_HELP}")
    add("--image-size", type=_number(int, 1), default=None, metavar="PX",
        help="input resolution: resize the shorter side (to PX, or PX/0.875 above 64 px), then "
        "center-crop PX (default: the export's training size, else 32)")
    add("--batch-size", type=_number(int, 1), default=256, metavar="N",
        help="images per forward pass and process (default: 256)")
    add("--num-workers", type=_number(int, 0), default=2, metavar="N",
        help="data loading worker processes per process (default: 2)")
    add("--max-train", type=_number(int, 1), default=None, metavar="N",
        help="use only the first N train samples by global index (default: all)")
    add("--max-test", type=_number(int, 1), default=None, metavar="N",
        help="use only the first N test samples by global index (default: all)")
    add("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="normalisation mean (default: the export's training mean, else ImageNet's)")
    add("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
        help="normalisation std (default: the export's training std, else ImageNet's)")
    add("--results", default="results.jsonl", metavar="PATH",
        help="JSON-lines file each result is appended to (default: results.jsonl)")
    add("--random-init-baseline", action="store_true",
        help="also evaluate the same architecture at random initialisation (torch.manual_seed(0))")
    add("--device", default="auto",
        help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ... (default: auto)")
    # fmt: on


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m eval`` argument parser (one subcommand per protocol)."""
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate frozen backbones; each result is appended as one JSON line.",
    )
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    knn = sub.add_parser(
        "knn",
        help="weighted k-NN on frozen features (Wu et al. 2018, DINO protocol)",
        description="Weighted k-NN: cosine similarity of each test feature to all train "
        "features; the k nearest vote with weight exp(sim / T). Reports top-1 / top-5 in percent.",
    )
    _add_common_args(knn)
    knn.add_argument(
        "--k", type=_number(int, 1), default=DEFAULT_K, help=f"neighbours (default: {DEFAULT_K})"
    )
    knn.add_argument(
        "--temperature",
        type=_number(float, 0.0, strict=True),
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"vote temperature T in exp(sim / T) (default: {DEFAULT_TEMPERATURE})",
    )
    return parser


def _device(name: str) -> torch.device:
    """Initialise the process group under torchrun, then pick the device."""
    info = init_distributed()
    return pick_device(info) if name == "auto" else torch.device(name)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _knn_metrics(backbone: Backbone, args: argparse.Namespace, device: torch.device) -> dict:
    """Features of train and test, then the weighted k-NN vote; adds the sample counts."""
    common = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": device,
        "mean": args.mean,
        "std": args.std,
    }
    train_x, train_y = extract_features(backbone, args.train, max_samples=args.max_train, **common)
    test_x, test_y = extract_features(backbone, args.test, max_samples=args.max_test, **common)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    metrics = knn_classify(train_x, train_y, test_x, test_y, args.k, args.temperature, num_classes)
    return metrics | {"num_train": train_x.shape[0], "num_test": test_x.shape[0]}


def _record(args: argparse.Namespace, metrics: dict, init: str, seconds: float) -> dict[str, Any]:
    """The results record (contract: DESIGN.md "Eval results")."""
    counts = {key: metrics.pop(key) for key in ("num_train", "num_test")}
    config = {
        "k": args.k,
        "temperature": args.temperature,
        "image_size": args.image_size,
        "max_train": args.max_train,
        "max_test": args.max_test,
        "train": str(Path(args.train).resolve()),
        "test": str(Path(args.test).resolve()),
        "init": init,
        "mean": args.mean,
        "std": args.std,
        "arch": args.arch,
        **counts,
    }
    return {
        "checkpoint": str(checkpoint_path(args.backbone)),
        "sha256": weights_sha256(args.backbone),
        "protocol": protocol_name(args.k, args.temperature),
        "dataset": dataset_name(args.test),
        "metrics": metrics,
        "config": config,
        "seconds": round(seconds, 3),
        "versions": versions(),
    }


def run_knn(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate the backbone (and, if asked, its random-init twin); append and return the records."""
    for data in (args.train, args.test):
        check_labelled(data)
    device = _device(args.device)
    backbone, name = load_backbone(args.backbone, args.arch)
    fill_input_defaults(args, export_spec(args.backbone))
    candidates = [("trained", backbone)]
    if args.random_init_baseline:
        candidates.append(("random", random_init_like(backbone, seed=0)))
    records = []
    for init, model in candidates:
        start = time.perf_counter()
        metrics = _knn_metrics(model, args, device)
        record = _record(args, metrics, init, time.perf_counter() - start)
        log.info("%s (%s): top1 %.2f top5 %.2f", name, init, metrics["top1"], metrics["top5"])
        if _is_main():
            append_result(args.results, record)
        records.append(record)
    return records


def fill_input_defaults(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    """Unset input options take the values the backbone was trained with (``backbone.yaml``)."""
    if args.image_size is None:
        args.image_size = int(spec.get("image_size", 32))
    if args.mean is None:
        args.mean = list(spec.get("mean", IMAGENET_MEAN))
    if args.std is None:
        args.std = list(spec.get("std", IMAGENET_STD))


PROTOCOLS = {"knn": run_knn}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for input errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        records = PROTOCOLS[args.protocol](args)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if _is_main():
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
