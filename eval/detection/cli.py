"""``python -m eval detect``: options and the per-init evaluation ``_run`` calls."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from eval.detection.data import CocoDetection
from eval.detection.models import build_detector
from eval.detection.train import (
    OPTIMIZERS,
    DetectTrainConfig,
    coco_bbox_metrics,
    predict,
    train_detector,
)
from eval.load import add_backbone_args
from eval.options import add_input_output_args, number
from pretrain.backbones import Backbone

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Detection transfer: torchvision Faster R-CNN with an FPN over a ResNet's layer1-4 "
    "(FrozenBatchNorm) or a ViTDet simple feature pyramid over a ViT's last-layer tokens "
    "(strides 4/8/16/32 + a stride-64 max-pool level), trained for --iters iterations (SGD or "
    "AdamW, linear warmup then cosine) on a COCO-format train set with random horizontal flips, "
    "then evaluated with pycocotools COCOeval (bbox) on the val set: AP (AP@[.5:.95]), AP50, "
    "AP75 in percent. The backbone is fine-tuned, or frozen with --freeze-backbone (the "
    "FPN / pyramid and the detection heads are always trained). One process."
)


def add_detect_args(p: argparse.ArgumentParser) -> None:
    """Every option of ``detect`` (it does not share the classification data options)."""
    add_backbone_args(p)
    add = p.add_argument
    # fmt: off
    add("--train", required=True, metavar="JSON",
        help="COCO instances JSON of the train images (e.g. .../raccoon/instances_train.json)")
    add("--test", required=True, metavar="JSON",
        help="COCO instances JSON of the evaluation images (e.g. .../instances_val.json)")
    add("--images", default=None, metavar="DIR",
        help="directory holding the images both JSON files name (default: images/ next to "
        "each JSON file)")
    add("--min-size", type=number(int, 1), default=320, metavar="PX",
        help="resize so the shorter image side is PX (model transform; default: 320)")
    add("--max-size", type=number(int, 1), default=512, metavar="PX",
        help="... and the longer side at most PX (default: 512)")
    add("--iters", type=number(int, 1), default=1000, metavar="N",
        help="training iterations (default: 1000)")
    add("--warmup-iters", type=number(int, 0), default=100, metavar="N",
        help="iterations of linear learning-rate warmup before the cosine decay (default: 100)")
    add("--batch-size", type=number(int, 1), default=2, metavar="N",
        help="images per training iteration and per evaluation forward (default: 2)")
    add("--optimizer", choices=OPTIMIZERS, default="sgd",
        help="sgd (momentum) or adamw (default: sgd)")
    add("--lr", type=number(float, 0.0, strict=True), default=None, metavar="LR",
        help="peak learning rate (default: sgd 0.02 * batch_size / 16, adamw 1e-4)")
    add("--momentum", type=number(float, 0.0), default=0.9, metavar="M",
        help="SGD momentum (default: 0.9)")
    add("--weight-decay", type=number(float, 0.0), default=None, metavar="WD",
        help="weight decay, not on 1-D parameters (default: sgd 1e-4, adamw 0.05)")
    add("--freeze-backbone", action="store_true",
        help="keep the backbone weights fixed (train only the FPN / pyramid and the heads)")
    add("--trainable-layers", type=int, choices=range(6), default=5, metavar="N",
        help="ResNet only: fine-tune the last N of layer4, layer3, layer2, layer1, stem (0-5; "
        "default: 5, all); BatchNorm stays frozen either way")
    add("--max-train", type=number(int, 1), default=None, metavar="N",
        help="train on only the first N train images by id (default: all)")
    add("--max-val", dest="max_test", type=number(int, 1), default=None, metavar="N",
        help="evaluate on only the first N val images by id (default: all)")
    add("--num-workers", type=number(int, 0), default=2, metavar="N",
        help="data loading worker processes (default: 2)")
    add("--seed", type=int, default=0,
        help="seed of the head initialisation, batch order and flips (default: 0)")
    # fmt: on
    add_input_output_args(p)


def train_config(args: argparse.Namespace) -> DetectTrainConfig:
    return DetectTrainConfig(
        iters=args.iters,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        num_workers=args.num_workers,
        seed=args.seed,
    )


def detect_metrics(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """Train a Faster R-CNN on ``backbone`` and evaluate it: ``(metrics, config extras)``."""
    train = CocoDetection(args.train, args.images, train=True, max_images=args.max_train)
    val = CocoDetection(args.test, args.images, max_images=args.max_test)
    if train.category_ids != val.category_ids:
        raise ValueError(f"{args.train} and {args.test} name different categories")
    cfg = train_config(args)
    torch.manual_seed(args.seed)  # the FPN / pyramid and heads start the same for every init
    model = build_detector(backbone, train.num_classes, frozen=args.freeze_backbone,
                           trainable_layers=args.trainable_layers, min_size=args.min_size,
                           max_size=args.max_size, mean=args.mean, std=args.std)  # fmt: skip
    summary = train_detector(model, train, cfg, device)
    detections = predict(model, val, device, args.batch_size, args.num_workers)
    metrics = coco_bbox_metrics(val, detections)
    extras = {
        "iters": cfg.iters,
        "warmup_iters": cfg.warmup_iters,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "lr": cfg.peak_lr(),
        "momentum": cfg.momentum,
        "weight_decay": cfg.decay(),
        "min_size": args.min_size,
        "max_size": args.max_size,
        "frozen": args.freeze_backbone,
        "trainable_layers": None
        if backbone.family != "resnet"
        else (0 if args.freeze_backbone else args.trainable_layers),
        "family": backbone.family,
        "seed": args.seed,
        "num_train": len(train),
        "num_test": len(val),
        "num_detections": len(detections),
        **summary,
    }
    return metrics, extras
