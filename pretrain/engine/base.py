"""The engine interface the training loop uses, and its config.

An engine takes single-device model code and applies distribution from outside: ``wrap`` the
method (sharding / replication of ``student`` and ``teacher``), ``attach_optimizer`` (e.g. hand
it to DeepSpeed, or tell LARS/LAMB how parameters are sharded), ``autocast``, ``backward``,
``step`` (unscale, clip, step, zero), and the checkpoint hooks ``save_state``/``load_state``
(collective: sharded engines write their own files into the checkpoint directory) and
``full_model_state`` (the plain, consolidated ``method.state_dict()`` used for export).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pretrain.methods.base import Method


@dataclass
class EngineConfig:
    """``precision``: ``auto`` = bf16 on CUDA, fp32 on the CPU (bf16 is ~180× slower than fp32
    on CPUs without AMX). ``grad_clip``: max global grad norm (``None``: off). ``sync_bn``:
    BatchNorm statistics over the global batch when distributed.

    FSDP2 (``name: fsdp``): ``reduce_dtype`` of gradient reductions under bf16/fp16 parameters
    (fp32 by default); ``activation_checkpointing`` and ``compile`` apply per block (ViT block,
    ResNet stage) in that order, before sharding. DeepSpeed (``name: deepspeed``):
    ``zero_stage`` 1, 2 or 3; ``deepspeed_config`` a JSON file whose keys override the generated
    config (merged recursively).
    """

    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float | None = None
    sync_bn: bool = True
    channels_last: bool = True
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    zero_stage: int = 2
    deepspeed_config: str | None = None

    def validate(self) -> None:
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"engine.grad_clip: must be > 0 or null, got {self.grad_clip}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage: must be 1, 2 or 3, got {self.zero_stage}")
        if self.deepspeed_config is not None and self.name != "deepspeed":
            raise ValueError("engine.deepspeed_config: only used with engine.name=deepspeed")


class Engine:
    """wrap → (autocast → forward) → backward → step; plus checkpoint and export state."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: EngineConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.dtype = resolve_precision(cfg.precision, device)
        self.per_device_batch: int | None = None  # set by the loop (DeepSpeed's counters)

    def wrap(self, method: Method) -> Method:
        raise NotImplementedError

    def attach_optimizer(self, method: Method, optimizer: torch.optim.Optimizer) -> Any:
        """Called once after the optimizer is built over ``method.student``'s parameters;
        returns the object the loop steps (and whose ``param_groups`` the schedule sets)."""
        return optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, optimizer: Any, params: list[nn.Parameter]) -> dict[str, float]:
        raise NotImplementedError

    def save_state(self, method: Method, optimizer: Any, directory: Path) -> dict[str, Any]:
        """Collective. Write what this engine shards into ``directory`` and return what goes
        into rank 0's ``state.pt`` (replicated engines: the model and optimizer themselves)."""
        raise NotImplementedError

    def load_state(
        self, method: Method, optimizer: Any, directory: Path, state: dict[str, Any]
    ) -> None:
        """Collective. Inverse of :meth:`save_state`; ``state`` is the loaded ``state.pt``."""
        raise NotImplementedError

    def full_model_state(self, method: Method) -> dict[str, torch.Tensor] | None:
        """Collective. The plain ``method.state_dict()`` (CPU tensors) on rank 0, else ``None``."""
        raise NotImplementedError


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; fp16 needs CUDA (grad scaling)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("engine.precision: fp16 needs CUDA (use fp32 or bf16 on the CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
