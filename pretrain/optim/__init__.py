"""Optimizers and parameter groups: LARS, LAMB, AdamW, SGD; no decay/adaptation on 1-D
parameters; optional layer-wise lr decay for ViTs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.optim.lamb import Lamb
from pretrain.optim.lars import LARS
from pretrain.optim.layer_decay import layer_decay_param_groups

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """``lr = base_lr × scale(global_batch / base_batch_size)`` with ``lr_scaling`` linear
    (Goyal et al.), sqrt, or none. Warmup is linear over ``warmup_steps``, then cosine to
    ``final_lr_ratio × lr``. 1-D parameters (biases, norms) get no weight decay and, under LARS,
    no trust-ratio adaptation."""

    name: Literal["lars", "lamb", "adamw", "sgd"] = "lars"
    base_lr: float = 0.3
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    base_batch_size: int = 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trust_coefficient: float = 0.001
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    weight_decay_end: float | None = None  # cosine from weight_decay to this (DINO: 0.04 → 0.4)
    layer_decay: float | None = None  # ViT layer-wise lr decay (BEiT/MAE fine-tune: 0.65-0.75)
    fused: bool | None = None  # AdamW/SGD fused CUDA kernels; None: when every param is on CUDA

    def validate(self) -> None:
        if self.base_lr <= 0:
            raise ValueError(f"optim.base_lr: must be > 0, got {self.base_lr}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"optim.final_lr_ratio: must be in [0, 1], got {self.final_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay: must be in (0, 1], got {self.layer_decay}")


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """The peak learning rate after the batch-size scaling rule."""
    ratio = global_batch_size / cfg.base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    return cfg.base_lr * factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ≥2-D weights (decay, LARS adaptation) and 1-D params (neither)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "trust_adaptation": True},
        {"params": no_decay, "weight_decay": 0.0, "trust_adaptation": False},
    ]


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, global_batch_size: int
) -> tuple[torch.optim.Optimizer, float]:
    """The optimizer over ``model``'s trainable parameters and its resolved peak lr."""
    lr = scaled_lr(cfg, global_batch_size)
    if cfg.layer_decay is not None:
        groups = layer_decay_param_groups(model, cfg.weight_decay, cfg.layer_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        opt: torch.optim.Optimizer = LARS(
            groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient
        )
    elif cfg.name == "lamb":
        opt = Lamb(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    else:
        for g in groups:
            g.pop("trust_adaptation")
        fused = use_fused(cfg.fused, groups)
        if cfg.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused)
    log.info(
        "optimizer %s: lr %.4g = base_lr %.4g × %s(%d / %d)",
        cfg.name,
        lr,
        cfg.base_lr,
        cfg.lr_scaling,
        global_batch_size,
        cfg.base_batch_size,
    )
    return opt, lr


def use_fused(fused: bool | None, groups: list[dict]) -> bool | None:
    """``optim.fused``: ``None`` (auto) -> fused kernels when every parameter is a plain CUDA
    tensor (one kernel for the whole update instead of a few per tensor), else PyTorch's default
    (FSDP2's DTensor parameters keep it: fused + DTensor has had bugs, pytorch#126670)."""
    if fused is not None:
        return fused
    params = [p for g in groups for p in g["params"]]
    plain = all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    return True if params and plain else None


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr on every group (scaled by a group's ``lr_scale``, e.g. layer decay)
    and its weight decay on the groups that decay (1-D parameter groups keep 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("weight_decay", 0.0) > 0.0:
            group["weight_decay"] = weight_decay
