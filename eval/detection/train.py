"""Training a detector for a fixed number of iterations, then COCO bbox evaluation.

* Optimiser: SGD (momentum 0.9, weight decay 1e-4; peak ``lr = 0.02 * batch_size / 16``, the
  Detectron2 rule) or AdamW (betas 0.9, 0.999, weight decay 0.05, ``lr = 1e-4`` unless given,
  the ViTDet choice); no weight decay on 1-D parameters. Only parameters with ``requires_grad``
  are optimised (frozen backbones stay fixed).
* Schedule, per iteration: linear warmup over ``warmup_iters`` then half a cosine to 0
  (``eval.linear.lr_factor``). Batches are drawn from reshuffled passes over the train images
  (seeded), with random horizontal flips.
* Evaluation: ``pycocotools`` ``COCOeval`` (bbox) on the val images; ``AP`` = AP@[.5:.95],
  ``AP50``, ``AP75`` in percent (0 when nothing is detected).
* fp32 throughout (CPU and CUDA); one process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from eval.detection.data import CocoDetection, collate
from eval.linear import lr_factor
from pretrain.optim import param_groups

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class DetectTrainConfig:
    """Hyper-parameters of :func:`train_detector` (``lr`` / ``weight_decay`` None: per optimiser)."""

    iters: int = 1000
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_iters: int = 100
    num_workers: int = 2
    seed: int = 0
    log_every: int = 20

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.02 * self.batch_size / 16 if self.optimizer == "sgd" else 1e-4

    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 0.05


def make_optimizer(model: nn.Module, cfg: DetectTrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters (no decay on 1-D ones)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in param_groups(model, cfg.decay())
        if g["params"]
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.peak_lr(), momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=(0.9, 0.999))


def train_detector(
    model: nn.Module, data: CocoDetection, cfg: DetectTrainConfig, device: torch.device
) -> dict[str, Any]:
    """Train ``model`` (torchvision detection API) for ``cfg.iters`` iterations on ``data``;
    returns a summary (first / last total loss, last loss terms, seconds)."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = RandomSampler(data, num_samples=cfg.iters * cfg.batch_size, generator=generator)
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, drop_last=True)  # fmt: skip
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    peak, warmup = cfg.peak_lr(), min(cfg.warmup_iters, cfg.iters)
    first = last = math.nan
    terms: dict[str, float] = {}
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        lr = peak * lr_factor(step + 1, cfg.iters, warmup)  # step + 1: never a zero-lr step
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)  # classifier, box_reg, objectness, rpn_box_reg
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = loss.item()  # a host sync each step; detection steps are long anyway
        first = last if step == 0 else first
        if step % cfg.log_every == 0 or step == cfg.iters - 1:
            terms = {k: round(v.item(), 4) for k, v in losses.items()}
            log.info("detect iter %d/%d lr %.2e loss %.4f %s", step + 1, cfg.iters, lr, last, terms)
    return {"first_loss": first, "last_loss": last, "last_terms": terms,
            "train_seconds": round(time.perf_counter() - start, 3)}  # fmt: skip


@torch.no_grad()
def predict(
    model: nn.Module, data: CocoDetection, device: torch.device, batch_size: int = 2,
    num_workers: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """COCO-format detections (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) of
    ``model`` on every image of ``data`` (boxes in the stored images' pixels)."""
    model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    results = []
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs, strict=True):
            boxes = out["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(),
                                         out["labels"].tolist(), strict=True):  # fmt: skip
                results.append({"image_id": int(target["image_id"]),
                                "category_id": data.category_ids[label - 1],
                                "bbox": [round(v, 2) for v in box], "score": score})  # fmt: skip
    return results


def coco_bbox_metrics(data: CocoDetection, detections: list[dict[str, Any]]) -> dict[str, float]:
    """``COCOeval`` (bbox) of ``detections`` against ``data``'s images: ``AP`` (AP@[.5:.95]),
    ``AP50``, ``AP75`` in percent. pycocotools' printing goes to the debug log."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        log.warning("no detections on %d val images: AP 0", len(data))
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        gt = COCO(str(data.annotations))
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.params.imgIds = data.image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval:\n%s", text.getvalue())
    ap, ap50, ap75 = (max(float(s), 0.0) * 100 for s in evaluator.stats[:3])  # -1: no gt boxes
    return {"AP": ap, "AP50": ap50, "AP75": ap75}
