"""DDP engine: one plain process, or many under torchrun/srun (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.engine.base import Engine
from pretrain.methods.base import Method
from pretrain.modules.sync_bn import convert_sync_batchnorm


class DDPEngine(Engine):
    """Replicated parameters, gradients averaged by DDP; fp16 uses a GradScaler."""

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

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
