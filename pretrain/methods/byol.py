"""BYOL (Grill et al. 2020): online network with predictor regresses an EMA target network.

Online: backbone → projector → predictor gives ``p``; target (EMA of backbone + projector)
gives ``z'``. ``loss = L(p1, z2') + L(p2, z1')`` with the normalised MSE
:func:`normalized_mse_loss` (``2 − 2 cos``); the target gets no gradient. Its momentum follows
``τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2`` from 0.996 to 1 (§3.2). The target backbone is exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.regression import normalized_mse_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.ema import ema_update_, make_teacher
from pretrain.modules.encoder import Encoder
from pretrain.modules.heads import mlp
from pretrain.schedules import cosine_momentum


@dataclass
class BYOLConfig(MethodConfig):
    """Paper defaults: projector and predictor are Linear(4096) → BN → ReLU → Linear(256);
    target momentum 0.996 → 1 (cosine)."""

    name: str = "byol"
    momentum: float = 0.996
    hidden_dim: int = 4096
    dim: int = 256
    pred_hidden_dim: int = 4096

    def validate(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"method.momentum: must be in [0, 1], got {self.momentum}")


class BYOLStudent(nn.Module):
    def __init__(self, encoder: Encoder, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, views: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # One view at a time, as in the paper's code: BN statistics are per view.
        out = []
        for v in views:
            z = self.encoder(v)  # [b, dim]
            out.append((z, self.predictor(z)))  # projection, prediction
        return out


class BYOL(Method):
    views = "two_view"

    def __init__(self, cfg: BYOLConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(backbone.embed_dim, cfg.hidden_dim, cfg.dim, 2)
        predictor = mlp(cfg.dim, cfg.pred_hidden_dim, cfg.dim, 2)
        encoder = Encoder(backbone, projector)
        self.student = BYOLStudent(encoder, predictor)
        self.teacher = make_teacher(encoder)

    def momentum(self, state: StepState) -> float:
        return cosine_momentum(state.step, state.total_steps, self.cfg.momentum)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        (z1, p1), (_, p2) = self.run_student(views)
        with torch.no_grad():
            t1, t2 = (self.teacher(v) for v in views)  # [b, dim] targets
        loss_12, loss_21 = normalized_mse_loss(p1, t2), normalized_mse_loss(p2, t1)
        logs = {"loss_12": loss_12.detach(), "loss_21": loss_21.detach()}
        return LossOutput(loss_12 + loss_21, logs, embeddings=z1.detach())

    def after_step(self, state: StepState) -> dict[str, float]:
        m = self.momentum(state)
        ema_update_(self.teacher, self.student.encoder, m)
        return {"momentum": m}

    def export_backbone(self) -> Backbone:
        return self.teacher.backbone
