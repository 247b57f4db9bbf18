"""``python -m eval {knn,linear,finetune,semisup,detect} --backbone PATH [--arch NAME]
--train DATA --test DATA ...``: evaluate frozen backbones (``--backbone``: an export, a training run or checkpoint, or a released checkpoint
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
import torch.nn.functional as F

from eval.features import (
    cached_train_test_features,
    check_labelled,
)
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


def _fraction(text: str) -> float:
    """An argparse type: a float strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 and < 1")
    return value


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
    _add_common_args(knn)
    add_cache_args(knn)
    knn.add_argument(
        "--k", type=_number(int, 1), nargs="+", default=None, metavar="K",
        help="neighbours, one value per setting; alone, each pairs with T=0.07 "
        f"(default: both common settings, {settings})",
    )  # fmt: skip
    knn.add_argument(
        "--temperature", type=_number(float, 0.0, strict=True), nargs="+", default=None,
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
    _add_common_args(linear)
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
    add("--lrs", type=_number(float, 0.0, strict=True), nargs="+", default=list(DEFAULT_LRS),
        metavar="LR", help=f"learning-rate grid, one head each, trained in one pass (default: {lrs})")
    add("--epochs", type=_number(int, 1), default=90, metavar="N",
        help="passes over the train features (default: 90)")
    add("--warmup-epochs", type=_number(float, 0.0), default=10.0, metavar="N",
        help="epochs of linear learning-rate warmup before the cosine decay (default: 10)")
    add("--probe-batch-size", type=_number(int, 2), default=1024, metavar="N",
        help="feature rows per probe step (default: 1024)")
    add("--optimizer", choices=OPTIMIZERS, default="sgd",
        help="sgd, or lars (pretrain.optim.lars; biases without trust ratio) (default: sgd)")
    add("--momentum", type=_number(float, 0.0), default=0.9, metavar="M",
        help="SGD / LARS momentum (default: 0.9)")
    add("--weight-decay", type=_number(float, 0.0), default=0.0, metavar="WD",
        help="weight decay of the head (default: 0)")
    add("--val-fraction", type=_fraction, default=0.1, metavar="F",
        help="fraction (0 < F < 1) of the train samples held out (seeded) to choose the "
        "learning rate (default: 0.1)")
    add("--seed", type=int, default=0,
        help="seed of the validation split, head initialisation and batch order (default: 0)")
    # fmt: on
    add_cache_args(p)


def _device(name: str) -> torch.device:
    """Initialise the process group under torchrun, then pick the device."""
    info = init_distributed()
    return pick_device(info) if name == "auto" else torch.device(name)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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
    for k, temperature in knn_settings(args):
        metrics = knn_classify(train_x, train_y, test_x, test_y, k, temperature, num_classes)
        extras = {"k": k, "temperature": temperature} | sizes
        results.append((protocol_name(k, temperature), metrics, extras))
    return results


def knn_settings(args: argparse.Namespace) -> list[tuple[int, float]]:
    """The (k, T) settings of ``eval knn``'s options (:func:`eval.knn.pair_settings`)."""
    try:
        return pair_settings(args.k, args.temperature)
    except ValueError as exc:
        raise EvalInputError(str(exc)) from None


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


def _record(
    args: argparse.Namespace, protocol: str, metrics: dict, extras: dict, init: str, seconds: float
) -> dict[str, Any]:
    """The results record (contract: DESIGN.md "Eval results"); ``extras`` join the config."""
    config = {
        **extras,
        "image_size": args.image_size,
        "max_train": args.max_train,
        "max_test": args.max_test,
        "train": str(Path(args.train).resolve()),
        "test": str(Path(args.test).resolve()),
        "init": init,
        "mean": args.mean,
        "std": args.std,
        "arch": args.arch,
    }
    return {
        "checkpoint": str(checkpoint_path(args.backbone)),
        "sha256": weights_sha256(args.backbone),
        "protocol": protocol,
        "dataset": dataset_name(args.test),
        "metrics": metrics,
        "config": config,
        "seconds": round(seconds, 3),
        "versions": versions(),
    }


def _run(
    args: argparse.Namespace, evaluate, protocol: str | None = None, check_data: bool = True
) -> list[dict[str, Any]]:
    """Evaluate the backbone (and, if asked, its random-init twin) with ``evaluate(backbone,
    args, device, init)``, which returns ``(metrics, config extras)`` recorded as ``protocol``,
    or, with ``protocol=None``, a list of ``(protocol, metrics, config extras)`` (one evaluation,
    several records). Rank 0 appends the records; all are returned. ``check_data``: the train /
    test data are labelled image sets."""
    for data in (args.train, args.test) if check_data else ():
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
        results = evaluate(model, args, device, init)
        seconds = time.perf_counter() - start
        for proto, metrics, extras in results if protocol is None else [(protocol, *results)]:
            record = _record(args, proto, metrics, extras, init, seconds)
            shown = " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
            log.info("%s (%s) %s: %s", name, init, proto, shown)
            if _is_main():
                append_result(args.results, record)
            records.append(record)
    return records


def run_knn(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval knn``: weighted k-NN, every (k, T) setting (see ``eval/knn.py``)."""
    knn_settings(args)  # option errors before any work
    return _run(args, _knn_metrics)


def run_linear(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval linear``: linear probe with an lr grid (see ``eval/linear.py``)."""
    return _run(args, _linear_metrics, "linear")


def fill_input_defaults(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    """Unset input options take the values the backbone was trained with (``backbone.yaml``)."""
    if args.image_size is None:
        args.image_size = int(spec.get("image_size", 32))
    if args.mean is None:
        args.mean = list(spec.get("mean", IMAGENET_MEAN))
    if args.std is None:
        args.std = list(spec.get("std", IMAGENET_STD))


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
    _add_common_args(finetune)
    add_finetune_args(finetune)
    semisup = sub.add_parser(
        "semisup",
        help="fine-tune or linear-probe on a fixed, seeded 1%% / 10%% label subset",
        description="Semi-supervised evaluation: a seeded label subset of the train set "
        "(class-balanced by default), saved as an index file and reused by every later run "
        "(the file's seed wins), then --mode finetune or linear on it; reported on test.",
    )
    _add_common_args(semisup)
    add_semisup_args(semisup)


def run_finetune(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval finetune``: end-to-end fine-tuning (see ``eval/finetune.py``)."""
    from eval.finetune import finetune_metrics

    return _run(args, finetune_metrics, "finetune")


def run_semisup(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m eval semisup``: label-subset fine-tuning / probe (see ``eval/semisup.py``)."""
    from eval.semisup import semisup_metrics, semisup_protocol_name

    return _run(args, semisup_metrics, semisup_protocol_name(args.fraction, args.mode))


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
    return _run(args, detect_metrics, "detect", check_data=False)


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
    if _is_main():
        print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
