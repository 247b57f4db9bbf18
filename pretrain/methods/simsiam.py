"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives and no EMA.

``loss = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2`` with ``D`` the negative cosine
(:func:`negative_cosine_loss`), where ``z`` is the projector output and ``p = h(z)`` the
predictor output of the same (only) network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.regression import negative_cosine_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.heads import mlp


@dataclass
class SimSiamConfig(MethodConfig):
    """Paper defaults (§4, Appendix A): 3-layer projector of width 2048 with BN on every layer
    (the last BN without affine), 2-layer bottleneck predictor 2048 → 512 → 2048."""

    name: str = "simsiam"
    dim: int = 2048
    proj_layers: int = 3
    pred_hidden_dim: int = 512


class SimSiamStudent(nn.Module):
    def __init__(self, backbone: Backbone, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def forward(self, views: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # One view at a time, as in the paper's code: BN statistics are per view.
        out = []
        for v in views:
            z = self.projector(self.backbone(v))  # [b, dim]
            out.append((z, self.predictor(z)))  # projection, prediction
        return out


class SimSiam(Method):
    views = "two_view"

    def __init__(self, cfg: SimSiamConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(
            backbone.embed_dim, cfg.dim, cfg.dim, cfg.proj_layers, last_bn=True, bias=False
        )
        predictor = mlp(cfg.dim, cfg.pred_hidden_dim, cfg.dim, 2)
        self.student = SimSiamStudent(backbone, projector, predictor)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        (z1, p1), (z2, p2) = self.run_student(views)
        loss = negative_cosine_loss(p1, z2) / 2 + negative_cosine_loss(p2, z1) / 2
        return LossOutput(loss, {"neg_cos": loss.detach()}, embeddings=z1.detach())

    def export_backbone(self) -> Backbone:
        return self.student.backbone
