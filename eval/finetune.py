"""End-to-end fine-tuning: the whole backbone plus a new linear head on labelled data (MAE /
BEiT recipe, He et al. 2022 ``main_finetune.py``).

* Model: ``head(backbone(x))``; the head is ``Linear(D, C)`` with weights ~ N(0, 2e-5²) (MAE's
  trunc-normal std) and bias 0. ViTs are rebuilt with ``drop_path_rate`` (stochastic depth,
  timm's linear rule over depth) and the loaded weights; torchvision ResNets have no drop path.
* Optimiser: AdamW (betas 0.9, 0.999), peak ``lr = blr * batch_size / 256`` unless ``lr`` is
  given; no weight decay on 1-D parameters and ViT tokens. ViTs get layer-wise lr decay
  (``pretrain.optim.layer_decay``: ``lr_scale = decay^(L + 1 - layer_id)``; the head is the top
  layer); ``layer_decay = 1`` turns it off.
* Schedule, per step: linear warmup over ``warmup_epochs`` then half a cosine to 0
  (``eval.linear.lr_factor``), over ``epochs * (num_train // batch_size)`` steps (or ``max_steps``).
* Regularisation: mixup / cutmix (``timm.data.Mixup``, batch mode, switch prob 0.5) with label
  smoothing folded into the soft targets and ``SoftTargetCrossEntropy``; without mixup/cutmix,
  ``LabelSmoothingCrossEntropy`` (plain cross-entropy when smoothing is 0).
* Augmentation: random resized crop + flip at the eval image size (``eval.finetune_data``).
* Test: the eval transform of the other protocols (resize + center crop); top-1 / top-5 in percent.
* bf16 autocast on CUDA; one process (``torchrun`` with several ranks is refused).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from data_prep.manifest import Manifest, is_shard_dir
from eval.features import _transform
from eval.finetune_data import LabelledTrainStream, dataset_labels, train_loader, train_transform
from eval.linear import lr_factor
from eval.load import EvalInputError
from pretrain.backbones import Backbone, build_backbone
from pretrain.data.loader import eval_loader
from pretrain.optim import param_groups
from pretrain.optim.layer_decay import layer_decay_param_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (defaults: MAE's ViT-B fine-tuning recipe)."""

    epochs: int = 100
    batch_size: int = 256
    blr: float = 5e-4
    lr: float | None = None  # absolute peak lr; None: blr * batch_size / 256
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 5.0
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    smoothing: float = 0.1
    drop_path: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    num_workers: int = 2

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


class Classifier(nn.Module):
    """``backbone`` + a new ``Linear(embed_dim, num_classes)``: ``[B, 3, H, W] -> [B, C]``."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # [B, C]


def with_drop_path(backbone: Backbone, rate: float) -> Backbone:
    """A copy of ``backbone`` with stochastic depth ``rate`` (ViTs: rebuilt with timm's
    ``drop_path_rate`` and the same weights); ResNets are returned as copies, unchanged."""
    if backbone.family != "vit":
        if rate > 0:
            log.info("drop path %.2f ignored: torchvision ResNets have none", rate)
        return copy.deepcopy(backbone)
    cfg = copy.deepcopy(backbone.cfg)
    cfg.drop_path_rate = rate
    rebuilt = build_backbone(cfg)
    rebuilt.net.load_state_dict(backbone.net.state_dict())
    return rebuilt


def optimizer_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale``: layer-wise decay for ViTs, plain decay/no-decay
    split (scale 1) otherwise."""
    if model.backbone.family == "vit":
        return layer_decay_param_groups(model, weight_decay, layer_decay)
    return [g | {"lr_scale": 1.0} for g in param_groups(model, weight_decay) if g["params"]]


def _criterion(cfg: FinetuneConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """``(mixup or None, loss)``: mixup/cutmix with smoothed soft targets, else smoothing CE."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=0.5, mode="batch", label_smoothing=cfg.smoothing,
                      num_classes=num_classes)  # fmt: skip
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def finetune(
    backbone: Backbone,
    train_path: str | Path,
    train_indices: Sequence[int],
    num_classes: int,
    cfg: FinetuneConfig,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> tuple[Classifier, dict[str, Any]]:
    """Fine-tune a copy of ``backbone`` + a new head on ``train_indices`` of ``train_path``.

    Returns the trained classifier (eval mode) and a summary (steps, peak lr, last loss, ...).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = Classifier(with_drop_path(backbone, cfg.drop_path), num_classes).to(device)
    batch_size = min(cfg.batch_size, len(train_indices))
    mixup, criterion = _criterion(cfg, num_classes)
    if mixup is not None:
        batch_size -= batch_size % 2  # mixup pairs a batch with its flip: even sizes only
    if batch_size < 1 or (mixup is not None and batch_size < 2):
        raise EvalInputError(f"{train_path}: too few train samples ({len(train_indices)})")
    groups = optimizer_groups(model, cfg.weight_decay, cfg.layer_decay)
    peak = cfg.peak_lr()
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    steps_per_epoch = max(len(train_indices) // batch_size, 1)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    stream = LabelledTrainStream(
        train_path, train_indices, train_transform(image_size, mean, std), cfg.seed
    )
    loader = train_loader(stream, batch_size, cfg.num_workers)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    log.info("finetune: %d samples, batch %d, %d steps, peak lr %.3g", len(train_indices),
             batch_size, total, peak)  # fmt: skip
    model.train()
    step, losses, start = 0, [], time.perf_counter()
    epochs = math.ceil(total / steps_per_epoch)
    for epoch in range(epochs):
        if epoch:
            _log_progress(epoch, epochs, step, total, losses, batch_size, start)
        stream.set_epoch(epoch)
        for images, labels, _ in loader:
            if step >= total:
                break
            factor = lr_factor(step, total, warmup)
            for group in opt.param_groups:
                group["lr"] = peak * group["lr_scale"] * factor
            images = images.to(device, non_blocking=True)  # [b, 3, S, S]
            labels = labels.to(device, non_blocking=True)  # [b]
            if mixup is not None:
                images, targets = mixup(images, labels)  # targets [b, C] soft
            else:
                targets = labels
            with autocast:
                logits = model(images)  # [b, C]
            loss = criterion(logits.float(), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())  # a sync per step: negligible next to the backward
            step += 1
        if step >= total:
            break
    summary = {"steps": step, "peak_lr": peak, "batch_size": batch_size,
               "last_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None}  # fmt: skip
    return model.eval(), summary


def _log_progress(
    epoch: int, epochs: int, step: int, total: int, losses: list[float], batch: int, start: float
) -> None:
    """One line per finished epoch: steps done, mean loss of the epoch's steps, images/s."""
    recent = losses[-max(step // epoch, 1) :]
    rate = step * batch / max(time.perf_counter() - start, 1e-9)
    log.info("finetune epoch %d/%d: step %d/%d, loss %.4f, %.1f img/s", epoch, epochs, step,
             total, sum(recent) / max(len(recent), 1), rate)  # fmt: skip


@torch.inference_mode()
def evaluate_classifier(
    model: nn.Module,
    data_path: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``model`` on the first ``max_samples`` samples."""
    device = torch.device(device)
    loader = eval_loader(str(data_path), _transform(image_size, mean, std), batch_size,
                         num_workers)  # fmt: skip
    limit = max_samples if max_samples is not None else sys.maxsize
    model.eval()
    hit1 = hit5 = count = 0
    for batch in loader:
        keep = batch["index"] < limit  # [b]
        if not keep.any():
            break
        images = batch["image"][keep].to(device)  # [b', 3, S, S]
        labels = batch["label"][keep].to(device).view(-1, 1)  # [b', 1]
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images).float()  # [b', C]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [b', k]
        hit1 += int((top[:, :1] == labels).sum())
        hit5 += int((top == labels).any(dim=1).sum())
        count += labels.shape[0]
    total = max(count, 1)
    return {"top1": 100.0 * hit1 / total, "top5": 100.0 * hit5 / total, "num_test": count}


def num_samples(data_path: str | Path) -> int:
    """How many samples ``data_path`` holds (manifest count / image-folder files)."""
    if is_shard_dir(data_path):
        return Manifest.load(data_path).num_samples
    from torchvision.datasets import ImageFolder

    return len(ImageFolder(str(data_path)).samples)


def num_classes_of(train_path: str | Path, test_path: str | Path) -> int:
    """The class count: the train manifest's / folder's class list, else the largest label + 1."""
    if is_shard_dir(train_path):
        classes = Manifest.load(train_path).classes
        if classes:
            return len(classes)
        labels = torch.cat([dataset_labels(train_path), dataset_labels(test_path)])
        return int(labels.max()) + 1
    return len([d for d in Path(train_path).iterdir() if d.is_dir()])


# ----------------------------------------------------------------------------- CLI glue


def add_finetune_args(p: argparse.ArgumentParser, mode_defaults: bool = False) -> None:
    """Fine-tuning options; with ``mode_defaults`` (semisup) ``--epochs``, ``--warmup-epochs``
    and ``--weight-decay`` default to None (the chosen mode's default)."""
    d = FinetuneConfig()
    add = p.add_argument

    def default(mode_text: str, value: float) -> str:
        return f"(default: per --mode: {mode_text})" if mode_defaults else f"(default: {value:g})"

    # fmt: off
    add("--epochs", type=int, default=None if mode_defaults else d.epochs, metavar="N",
        help=f"passes over the train set {default('finetune 100, linear 90', d.epochs)}")
    add("--warmup-epochs", type=float, default=None if mode_defaults else d.warmup_epochs,
        metavar="N", help="epochs of linear lr warmup before the cosine "
        + default("finetune 5, linear 10", d.warmup_epochs))
    add("--weight-decay", type=float, default=None if mode_defaults else d.weight_decay,
        metavar="WD", help="weight decay (finetune: AdamW, none on 1-D params) "
        + default("finetune 0.05, linear 0", d.weight_decay))
    add("--blr", type=float, default=d.blr,
        help=f"base lr; peak lr = blr * batch size / 256 (default: {d.blr:g})")
    add("--lr", type=float, default=None, help="absolute peak lr (overrides --blr scaling)")
    add("--layer-decay", type=float, default=d.layer_decay,
        help=f"ViT layer-wise lr decay; 1 disables (default: {d.layer_decay:g})")
    add("--mixup", type=float, default=d.mixup, metavar="ALPHA",
        help=f"mixup alpha, 0 disables (default: {d.mixup:g})")
    add("--cutmix", type=float, default=d.cutmix, metavar="ALPHA",
        help=f"cutmix alpha, 0 disables (default: {d.cutmix:g})")
    add("--mixup-prob", type=float, default=d.mixup_prob, metavar="P",
        help=f"probability of mixing a batch (default: {d.mixup_prob:g})")
    add("--smoothing", type=float, default=d.smoothing,
        help=f"label smoothing (default: {d.smoothing:g})")
    add("--drop-path", type=float, default=d.drop_path, metavar="RATE",
        help=f"stochastic depth rate of ViTs (default: {d.drop_path:g})")
    add("--max-steps", type=int, default=None, metavar="N",
        help="stop after N optimizer steps; the schedule is shortened to N (default: none)")
    add("--seed", type=int, default=0, help="seed of init, batch order, augmentation (default: 0)")
    # fmt: on


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` the parsed options ask for."""
    d = FinetuneConfig()
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return FinetuneConfig(
        epochs=pick(args.epochs, d.epochs), batch_size=args.batch_size, blr=args.blr,
        lr=args.lr, weight_decay=pick(args.weight_decay, d.weight_decay),
        layer_decay=args.layer_decay, warmup_epochs=pick(args.warmup_epochs, d.warmup_epochs),
        mixup=args.mixup, cutmix=args.cutmix, mixup_prob=args.mixup_prob,
        smoothing=args.smoothing, drop_path=args.drop_path, seed=args.seed,
        max_steps=args.max_steps, num_workers=args.num_workers,
    )  # fmt: skip


def check_single_process() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise EvalInputError("finetune / semisup run in one process; start without torchrun")


def run_finetune_eval(
    backbone: Backbone,
    args: argparse.Namespace,
    device: torch.device,
    train_indices: Sequence[int],
) -> tuple[dict, dict]:
    """Fine-tune on ``train_indices`` and evaluate on ``args.test``: ``(metrics, config)``."""
    check_single_process()
    cfg = finetune_config(args)
    classes = num_classes_of(args.train, args.test)
    common = {"image_size": args.image_size, "mean": args.mean, "std": args.std}
    model, summary = finetune(backbone, args.train, train_indices, classes, cfg, device=device,
                              **common)  # fmt: skip
    metrics = evaluate_classifier(model, args.test, batch_size=args.batch_size,
                                  num_workers=args.num_workers, max_samples=args.max_test,
                                  device=device, **common)  # fmt: skip
    num_test = metrics.pop("num_test")
    extras = asdict(cfg) | summary | {"num_classes": classes, "num_train": len(train_indices),
                                      "num_test": num_test}  # fmt: skip
    return metrics, extras


def finetune_metrics(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str
) -> tuple[dict, dict]:
    """``python -m eval finetune``: the first ``--max-train`` train samples (all by default)."""
    n = num_samples(args.train)
    limit = n if args.max_train is None else min(n, args.max_train)
    return run_finetune_eval(backbone, args, device, range(limit))
