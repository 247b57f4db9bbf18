"""The engine interface the training loop uses, and its config."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pretrain.methods.base import Method


@dataclass
class EngineConfig:
    """``precision``: ``auto`` = bf16 autocast on CUDA, fp32 on the CPU (bf16 is ~180× slower
    than fp32 on CPUs without AMX). ``grad_clip``: max global grad norm (``None``: off).
    ``sync_bn``: BatchNorm statistics over the global batch when distributed."""

    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float | None = None
    sync_bn: bool = True
    channels_last: bool = True

    def validate(self) -> None:
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"engine.grad_clip: must be > 0 or null, got {self.grad_clip}")


class Engine:
    """wrap → (autocast → forward) → backward → step; plus state for checkpoints."""

    def __init__(self, cfg: EngineConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dtype = resolve_precision(cfg.precision, device)

    def wrap(self, method: Method) -> Method:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
    ) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; fp16 needs CUDA (grad scaling)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("engine.precision: fp16 needs CUDA (use fp32 or bf16 on the CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
