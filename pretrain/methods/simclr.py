"""SimCLR (Chen et al. 2020): two views, MLP projector, NT-Xent over the global batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.info_nce import nt_xent_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.heads import mlp


@dataclass
class SimCLRConfig(MethodConfig):
    """Paper defaults: 2-layer projector to 128-d; T=0.1 at batch 4096 (0.5 for CIFAR)."""

    name: str = "simclr"
    temperature: float = 0.1
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2


class SimCLRStudent(nn.Module):
    """Backbone + projector; all views go through one batched forward (one BN batch)."""

    def __init__(self, backbone: Backbone, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.backbone(torch.cat(views)))  # [V * b, proj_dim]


class SimCLR(Method):
    views = "two_view"

    def __init__(self, cfg: SimCLRConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.student = SimCLRStudent(backbone, projector)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        z1, z2 = self.run_student(views).chunk(2)  # [b, proj_dim] each
        loss = nt_xent_loss(z1, z2, self.cfg.temperature)
        return LossOutput(loss, embeddings=z1.detach())

    def export_backbone(self) -> Backbone:
        return self.student.backbone
