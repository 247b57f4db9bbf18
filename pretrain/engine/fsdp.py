"""FSDP2 engine: ``fully_shard`` per block (ViT block, ResNet stage) then per module group.

Student and teacher are sharded with the same mesh and mixed-precision policy, so every
parameter of the teacher has the same ``Shard(0)`` slice on a rank as its student counterpart
and the EMA update (``pretrain.modules.ema.ema_update_``) runs on the local shards with no
communication. Per block, activation checkpointing then ``torch.compile`` are applied before
sharding (the order torchtitan uses: checkpointing must see the eager block, sharding must
wrap the compiled one). Gradient clipping uses the global norm across shards; LARS/LAMB get a
:class:`~pretrain.optim.trust.ShardLayout` so their trust ratios use whole-parameter norms.

Checkpoints are ``torch.distributed.checkpoint`` directories (``dcp/`` in the checkpoint, one
file per rank plus metadata) holding ``method.state_dict()`` and the optimizer state keyed by
parameter name, so they load on any number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchvision.models import ResNet

from pretrain.engine.base import Engine
from pretrain.methods.base import Method
from pretrain.modules.sync_bn import convert_sync_batchnorm
from pretrain.optim.trust import ShardLayout

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPEngine(Engine):
    """Sharded parameters, gradients and optimizer state (FSDP2); bf16 via the MP policy."""

    name = "fsdp"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        if self.dtype == torch.float16:
            raise ValueError(
                "engine.precision: fp16 is not supported with engine.name=fsdp (it needs a "
                "sharded grad scaler); use bf16, or engine.name=deepspeed for fp16"
            )

    def wrap(self, method: Method) -> Method:
        ensure_process_group(self.device)
        if dist.get_world_size() > 1 and self.cfg.sync_bn:
            convert_sync_batchnorm(method, self.device)
        method.to(self.device)  # no channels-last weights: FSDP2 shards contiguous ones only
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(
            param_dtype=None if self.dtype == torch.float32 else self.dtype,
            reduce_dtype=REDUCE_DTYPES[self.cfg.reduce_dtype],
        )
        self.groups = [g for g in (method.student, method.teacher) if g is not None]
        for group in self.groups:
            self._shard(group, mesh, policy, trained=group is method.student)
        return method

    def _shard(self, group: nn.Module, mesh, policy: MixedPrecisionPolicy, trained: bool) -> None:
        """checkpointing (trained group only) → compile → ``fully_shard`` for each block, then
        the whole group."""
        for unit in shard_units(group):
            if self.cfg.activation_checkpointing and trained:
                apply_activation_checkpointing(unit)
            if self.cfg.compile:
                unit.compile()
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(group, mesh=mesh, mp_policy=policy)

    def attach_optimizer(self, method: Method, optimizer: torch.optim.Optimizer) -> Any:
        if hasattr(optimizer, "shard_layout"):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            optimizer.shard_layout = ShardLayout.for_dtensors(params)
        return optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: Any, params: list[nn.Parameter]) -> dict[str, float]:
        """Clip by the global norm over all shards, step, zero; leave every group resharded."""
        logs: dict[str, float] = {}
        if self.cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            logs["grad_norm"] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.reshard()
        return logs

    def reshard(self) -> None:
        """Free unsharded parameters left by a forward (a root module keeps them after forward;
        the teacher's no-grad forward has no backward to release them), so the EMA update and
        checkpoints see each rank's shards."""
        for group in self.groups:
            for module in group.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def save_state(self, method: Method, optimizer: Any, directory: Path) -> dict[str, Any]:
        state = {
            "model": method.state_dict(),
            "optim": get_optimizer_state_dict(method.student, optimizer),
        }
        dcp.save(state, checkpoint_id=directory / DCP_DIR)
        return {"engine": {}}

    def load_state(
        self, method: Method, optimizer: Any, directory: Path, state: dict[str, Any]
    ) -> None:
        target = {
            "model": method.state_dict(),
            "optim": get_optimizer_state_dict(method.student, optimizer),
        }
        dcp.load(target, checkpoint_id=directory / DCP_DIR)  # reshards to this world size
        method.load_state_dict(target["model"])
        set_optimizer_state_dict(method.student, optimizer, target["optim"])

    def full_model_state(self, method: Method) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(method, options=options)
        return state if dist.get_rank() == 0 else None


def shard_units(group: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: timm ViT ``Block``s (backbone and MAE decoder) and the
    four stages of torchvision ResNets, outermost first."""
    units: list[nn.Module] = []
    for module in group.modules():
        if isinstance(module, Block):
            units.append(module)
        elif isinstance(module, ResNet):
            units.extend([module.layer1, module.layer2, module.layer3, module.layer4])
    return units


def apply_activation_checkpointing(unit: nn.Module) -> None:
    """Recompute ``unit``'s activations in backward (non-reentrant; parameter names unchanged)."""
    from torch.distributed._composable import checkpoint

    checkpoint(unit)


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process: a private single-rank one then."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def load_plain_model_state(directory: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Consolidate the DCP checkpoint's ``model`` on the CPU without a process group."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(directory / DCP_DIR, out)
        return torch.load(out, map_location="cpu", weights_only=True)["model"]
