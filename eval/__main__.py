"""``python -m eval {knn,linear,finetune,semisup,detect,batch} --backbone PATH [--arch NAME]
--train DATA --test DATA ...``: evaluate frozen backbones (``--backbone``: an export, a training
run or checkpoint, or a released checkpoint file; see ``eval/load.py``).

The parser and the k-NN / linear protocols live here; :mod:`eval.runner` runs a protocol and
writes its records, :mod:`eval.options` holds the shared options.

Every result is one JSON line appended to ``--results`` (see ``eval/results.py``); the run ends
with a small table of this run's results. Input problems (missing path, unlabelled data) exit
with status 2 and a one-line message. Under ``torchrun`` each rank extracts features for its
part of the data; rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F

from eval.features import cached_train_test_features
from eval.knn import DEFAULT_SETTINGS, knn_classify, pair_settings, protocol_name
from eval.linear import (
    DEFAULT_LRS,
    OPTIMIZERS,
    ProbeConfig,
    add_cache_args,
    cache_of,
    cache_report,
    linear_probe,
    probe_config_dict,
)
from eval.load import EvalInputError
from eval.options import add_common_args, fraction, number
from eval.results import format_table
from eval.runner import is_main, run_protocol
from pretrain.backbones import Backbone


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m eval`` argument parser (one subcommand per protocol)."""
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate frozen backbones; each result is appended as one JSON line.",
    )
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    settings = ", ".join(f"{k}-NN T={t:g}" for k, t in DEFAULT_SETTINGS)
    knn = sub.add_parser(
        "knn",
        help="weighted k-NN on frozen features (Wu et al. 2018, DINO protocol)",
        description="Weighted k-NN: cosine similarity of each test feature to all train "
        "features; the k nearest vote with weight exp(sim / T). Reports top-1 / top-5 in percent, "
        f"one record per (k, T) setting, all from one feature extraction (default: {settings}).",
    )
    add_common_args(knn)
    add_cache_args(knn)
    knn.add_argument(
        "--k", type=number(int, 1), nargs="+", default=None, metavar="K",
        help="neighbours, one value per setting; alone, each pairs with T=0.07 "
        f"(default: both common settings, {settings})",
    )  # fmt: skip
    knn.add_argument(
        "--temperature", type=number(float, 0.0, strict=True), nargs="+", default=None,
        metavar="T", help="vote temperature T in exp(sim / T), paired element-wise with --k; "
        "alone, each pairs with k=20",
    )  # fmt: skip
    linear = sub.add_parser(
        "linear",
        help="linear probe on frozen features (MAE recipe), a learning-rate grid in one pass",
        description="Linear probe (MAE recipe): BatchNorm1d(affine=False) + Linear on the frozen "
        "pooled features, cross-entropy, SGD or LARS with momentum, cosine learning rate after a "
        "linear warmup. One head per --lrs value is trained in the same pass over the same "
        "batches; --val-fraction of the train set is held out (seeded) to pick the learning rate "
        "with the best validation top-1, and that head's test top-1 / top-5 (percent) are "
        "reported. Features are cached per (weights sha256, data, image size, normalisation, "
        "sample limit, split) in --cache-dir, so a second run does not run the backbone.",
    )
    add_common_args(linear)
    _add_linear_args(linear)
    _add_finetune_parsers(sub)
    _add_detect_parser(sub)
    sub.add_parser(  # parsed by eval/batch.py (main() hands it the arguments)
        "batch",
        add_help=False,
        help="many checkpoints x protocols -> one results file and table, resumable "
        "(python -m eval batch --help)",
    )
    return parser


def _add_linear_args(p: argparse.ArgumentParser) -> None:
    """Options of the linear probe (the probe's own batch size is --probe-batch-size)."""
    add = p.add_argument
    lrs = " ".join(f"{lr:g}" for lr in DEFAULT_LRS)
    # fmt: off
    add("--lrs", type=number(float, 0.0, strict=True), nargs="+", default=list(DEFAULT_LRS),
        metavar="LR", help=f"learning-rate grid, one head each, trained in one pass (default: {lrs})")
    add("--epochs", type=number(int, 1), default=90, metavar="N",
        help="passes over the train features (default: 90)")
    add("--warmup-epochs", type=number(float, 0.0), default=10.0, metavar="N",
        help="epochs of linear learning-rate warmup before the cosine decay (default: 10)")
    add("--probe-batch-size", type=number(int, 2), default=1024, metavar="N",
        help="feature rows per probe step (default: 1024)")
    add("--optimizer", choices=OPTIMIZERS, default="sgd",
        help="sgd, or lars (pretrain.optim.lars; biases without trust ratio) (default: sgd)")
    add("--momentum", type=number(float, 0.0), default=0.9, metavar="M",
        help="SGD / LARS momentum (default: 0.9)")
    add("--weight-decay", type=number(float, 0.0), default=0.0, metavar="WD",
        help="weight decay of the head (default: 0)")
    add("--val-fraction", type=fraction, default=0.1, metavar="F",
        help="fraction (0 < F < 1) of the train samples held out (seeded) to choose the "
        "learning rate (default: 0.1)")
    add("--seed", type=int, default=0,
        help="seed of the validation split, head initialisation and batch order (default: 0)")
    # fmt: on
    add_cache_args(p)


def _knn_metrics(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str
) -> list[tuple[str, dict, dict]]:
    """Features of train and test once, then the weighted k-NN vote per (k, T) setting:
    ``[(protocol, metrics, config extras), ...]``."""
    cache = cache_of(args)
    (train_x, train_y, _), (test_x, test_y, _) = cached_train_test_features(
        backbone, args, device, init, cache
    )
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    sizes = {"num_train": train_x.shape[0], "num_test": test_x.shape[0]}
    sizes["feature_cache"] = cache_report(cache)
    results = []
    for k, temperature in pair_settings(args.k, args.temperature):
        metrics = knn_classify(train_x, train_y, test_x, test_y, k, temperature, num_classes)
        extras = {"k": k, "temperature": temperature} | sizes
        results.append((protocol_name(k, temperature), metrics, extras))
    return results


def _linear_metrics(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str
) -> tuple[dict, dict]:
    """Cached (or extracted) raw features of train and test, then the linear probe grid."""
    cache = cache_of(args)
    (train_x, train_y, _), (test_x, test_y, _) = cached_train_test_features(
        backbone, args, device, init, cache
    )
    cfg = ProbeConfig(
        lrs=tuple(args.lrs),
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.probe_batch_size,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    if train_x.shape[0] < 3:
        raise EvalInputError(f"{args.train}: a linear probe needs at least 3 train samples")
    # every rank trains the same probe on the same gathered features; rank 0 writes the result
    result = linear_probe(train_x, train_y, test_x, test_y, cfg, args.val_fraction, device=device)
    probe = probe_config_dict(cfg)
    extras = {f"probe_{k}" if k == "batch_size" else k: v for k, v in probe.items()} | {
        "val_fraction": args.val_fraction,
        "lr": result.lr,
        "grid": result.grid,
        "feature_cache": cache_report(cache),
        "num_train": train_x.shape[0],
        "num_test": test_x.shape[0],
    }
    return result.metrics(), extras


def run_knn(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval knn``: weighted k-NN, every (k, T) setting (see ``eval/knn.py``)."""
    pair_settings(args.k, args.temperature)  # option errors before any work
    return run_protocol(args, _knn_metrics)


def run_linear(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval linear``: linear probe with an lr grid (see ``eval/linear.py``)."""
    return run_protocol(args, _linear_metrics, "linear")


def _add_finetune_parsers(sub) -> None:
    """The ``finetune`` and ``semisup`` subcommands (eval/finetune.py, eval/semisup.py)."""
    from eval.finetune import add_finetune_args
    from eval.semisup import add_semisup_args

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune the whole network + a new linear head (MAE recipe)",
        description="End-to-end fine-tuning (MAE recipe): AdamW with warmup + per-step cosine, "
        "layer-wise lr decay for ViTs, mixup/cutmix with label smoothing, drop path, random "
        "resized crop + flip; top-1 / top-5 (percent) on the test set. One process.",
    )
    add_common_args(finetune)
    add_finetune_args(finetune)
    semisup = sub.add_parser(
        "semisup",
        help="fine-tune or linear-probe on a fixed, seeded 1%% / 10%% label subset",
        description="Semi-supervised evaluation: a seeded label subset of the train set "
        "(class-balanced by default), saved as an index file and reused by every later run "
        "(the file's seed wins), then --mode finetune or linear on it; reported on test.",
    )
    add_common_args(semisup)
    add_semisup_args(semisup)


def run_finetune(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval finetune``: end-to-end fine-tuning (see ``eval/finetune.py``)."""
    from eval.finetune import finetune_metrics

    return run_protocol(args, finetune_metrics, "finetune")


def run_semisup(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval semisup``: label-subset fine-tuning / probe (see ``eval/semisup.py``)."""
    from eval.semisup import semisup_metrics, semisup_protocol_name

    return run_protocol(args, semisup_metrics, semisup_protocol_name(args.fraction, args.mode))


def _add_detect_parser(sub) -> None:
    """The ``detect`` subcommand (eval/detection/): its own data options (COCO JSON + images)."""
    from eval.detection.cli import DESCRIPTION, add_detect_args

    detect = sub.add_parser(
        "detect",
        help="Faster R-CNN + FPN (ResNet) / simple feature pyramid (ViT) on COCO-format data",
        description=DESCRIPTION,
    )
    add_detect_args(detect)


def run_detect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval detect``: detection transfer (see ``eval/detection/``)."""
    from eval.detection.cli import detect_metrics

    args.image_size = args.min_size  # the record's input size (fill_input_defaults keeps it)
    return run_protocol(args, detect_metrics, "detect", check_data=False)


PROTOCOLS = {"knn": run_knn, "linear": run_linear, "finetune": run_finetune,
             "semisup": run_semisup, "detect": run_detect}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for input errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["batch"]:  # eval/batch.py: runs the other subcommands through main()
        from eval.batch import main as batch_main

        return batch_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        records = PROTOCOLS[args.protocol](args)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_main():
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
