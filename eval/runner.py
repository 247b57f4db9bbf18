"""Running one protocol: load the backbone (and its random-init twin), evaluate, append the
records (rank 0), return them."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eval.features import check_labelled
from eval.load import (
    checkpoint_path,
    export_spec,
    load_backbone,
    random_init_like,
    weights_sha256,
)
from eval.results import append_result, dataset_name, versions
from pretrain.backbones import Backbone
from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD
from pretrain.dist import init_distributed, pick_device

log = logging.getLogger("eval")

Evaluate = Callable[[Backbone, argparse.Namespace, torch.device, str], Any]


def device_for(name: str) -> torch.device:
    """Initialise the process group under torchrun, then pick the device."""
    info = init_distributed()
    return pick_device(info) if name == "auto" else torch.device(name)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def make_record(
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


def run_protocol(
    args: argparse.Namespace,
    evaluate: Evaluate,
    protocol: str | None = None,
    check_data: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate the backbone (and, if asked, its random-init twin) with ``evaluate(backbone,
    args, device, init)``, which returns ``(metrics, config extras)`` recorded as ``protocol``,
    or, with ``protocol=None``, a list of ``(protocol, metrics, config extras)`` (one evaluation,
    several records). Rank 0 appends the records; all are returned. ``check_data``: the train /
    test data are labelled image sets."""
    for data in (args.train, args.test) if check_data else ():
        check_labelled(data)
    device = device_for(args.device)
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
            record = make_record(args, proto, metrics, extras, init, seconds)
            shown = " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
            log.info("%s (%s) %s: %s", name, init, proto, shown)
            if is_main():
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
