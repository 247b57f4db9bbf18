"""MoCo v3 (Chen, Xie, He 2021): predictor on the online branch, EMA momentum encoder.

Online: backbone → projector → predictor gives ``q``; momentum encoder (EMA of backbone +
projector) gives ``k``. ``loss = ctr(q1, k2) + ctr(q2, k1)`` with the InfoNCE of
:func:`moco_infonce_loss` over the global batch of keys. The momentum follows a cosine schedule
from ``momentum`` to 1 (Alg. 1 and §4 of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.info_nce import moco_infonce_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.ema import ema_update_, make_teacher
from pretrain.modules.encoder import Encoder
from pretrain.modules.heads import mlp
from pretrain.schedules import cosine_momentum


@dataclass
class MoCoV3Config(MethodConfig):
    """Paper defaults (ViT): 3-layer projector, 2-layer predictor, 4096 hidden, 256 out,
    T=0.2, momentum 0.99 → 1 (cosine). ResNet-50: 2-layer projector, T=1.0, m=0.99."""

    name: str = "mocov3"
    temperature: float = 0.2
    momentum: float = 0.99
    hidden_dim: int = 4096
    dim: int = 256
    proj_layers: int = 3
    pred_layers: int = 2


class MoCoV3Student(nn.Module):
    def __init__(self, encoder: Encoder, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        # One view at a time, as in the paper: BN statistics are per view.
        return [self.predictor(self.encoder(v)) for v in views]  # V × [b, dim]


class MoCoV3(Method):
    views = "two_view"

    def __init__(self, cfg: MoCoV3Config, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(
            backbone.embed_dim, cfg.hidden_dim, cfg.dim, cfg.proj_layers, last_bn=True, bias=False
        )
        predictor = mlp(cfg.dim, cfg.hidden_dim, cfg.dim, cfg.pred_layers, bias=False)
        encoder = Encoder(backbone, projector)
        self.student = MoCoV3Student(encoder, predictor)
        self.teacher = make_teacher(encoder)

    def momentum(self, state: StepState) -> float:
        return cosine_momentum(state.step, state.total_steps, self.cfg.momentum)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        q1, q2 = self.run_student(views)
        with torch.no_grad():
            k1, k2 = (self.teacher(v) for v in views)
        t = self.cfg.temperature
        loss = moco_infonce_loss(q1, k2, t) + moco_infonce_loss(q2, k1, t)
        return LossOutput(loss, embeddings=q1.detach())

    def after_step(self, state: StepState) -> dict[str, float]:
        m = self.momentum(state)
        ema_update_(self.teacher, self.student.encoder, m)
        return {"momentum": m}

    def export_backbone(self) -> Backbone:
        return self.teacher.backbone
