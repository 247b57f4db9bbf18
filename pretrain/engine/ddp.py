"""DDP engine: one plain process, or many under torchrun/srun (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.dist import rank
from pretrain.engine.base import Engine
from pretrain.methods.base import Method
from pretrain.modules.sync_bn import convert_sync_batchnorm


class DDPEngine(Engine):
    """Replicated parameters, gradients averaged by DDP; fp16 uses a GradScaler.

    Checkpoints hold the whole model and optimizer in rank 0's ``state.pt``: they load on any
    number of processes."""

    name = "ddp"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        enabled = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def wrap(self, method: Method) -> Method:
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed and self.cfg.sync_bn:
            convert_sync_batchnorm(method, self.device)
        method.to(self.device)
        if self.cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        if distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            method.set_student_runner(
                DistributedDataParallel(
                    method.student, device_ids=device_ids, broadcast_buffers=False
                )
            )
        return method

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
    ) -> dict[str, float]:
        """Unscale, clip by the global grad norm, step, update the scaler, zero the grads."""
        logs: dict[str, float] = {}
        self.scaler.unscale_(optimizer)
        if self.cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            logs["grad_norm"] = float(norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return logs

    def save_state(self, method: Method, optimizer: Any, directory: Path) -> dict[str, Any]:
        return {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "engine": {"scaler": self.scaler.state_dict()},
        }

    def load_state(
        self, method: Method, optimizer: Any, directory: Path, state: dict[str, Any]
    ) -> None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state.get("engine", {}):
            self.scaler.load_state_dict(state["engine"]["scaler"])

    def full_model_state(self, method: Method) -> dict[str, torch.Tensor] | None:
        return method.state_dict() if rank() == 0 else None
