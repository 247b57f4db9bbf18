"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings,
standardised over the global batch, is pushed towards the identity (:func:`barlow_twins_loss`).

The paper trains with LARS at lr 0.2 for weights and 0.0048 for biases and BN parameters (both
× B/256). Our optimizer has one lr for all groups, so :meth:`BarlowTwins.on_after_backward`
multiplies the gradients of 1-D parameters by ``bias_lr_ratio = 0.0048 / 0.2``: under LARS and
SGD, where 1-D parameters get plain momentum SGD without weight decay, that is exactly the same
update as a lower lr (under AdamW it has no effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.backbones import Backbone
from pretrain.losses.redundancy import barlow_twins_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.encoder import PerViewEncoder
from pretrain.modules.heads import mlp


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Paper defaults: 3-layer projector 8192-8192-8192 (BN + ReLU between, no biases),
    ``λ = 0.0051``; ``scale_loss`` multiplies the loss (1 in the paper, 0.1 in solo-learn's
    CIFAR recipe); ``bias_lr_ratio`` = 0.0048 / 0.2."""

    name: str = "barlow_twins"
    hidden_dim: int = 8192
    dim: int = 8192
    proj_layers: int = 3
    lambd: float = 0.0051
    scale_loss: float = 1.0
    bias_lr_ratio: float = 0.024

    def validate(self) -> None:
        if self.lambd < 0:
            raise ValueError(f"method.lambd: must be >= 0, got {self.lambd}")
        if self.bias_lr_ratio < 0:
            raise ValueError(f"method.bias_lr_ratio: must be >= 0, got {self.bias_lr_ratio}")


class BarlowTwins(Method):
    views = "two_view"

    def __init__(self, cfg: BarlowTwinsConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(backbone.embed_dim, cfg.hidden_dim, cfg.dim, cfg.proj_layers, bias=False)
        self.student = PerViewEncoder(backbone, projector)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        z1, z2 = self.run_student(views)  # [b, dim] each
        terms = barlow_twins_loss(z1, z2, self.cfg.lambd)
        logs = {"on_diag": terms.on_diag.detach(), "off_diag": terms.off_diag.detach()}
        return LossOutput(self.cfg.scale_loss * terms.loss, logs, embeddings=z1.detach())

    def on_after_backward(self, state: StepState) -> None:
        if self.cfg.bias_lr_ratio == 1.0:
            return
        for p in self.student.parameters():
            if p.ndim <= 1 and p.grad is not None:
                p.grad.mul_(self.cfg.bias_lr_ratio)

    def export_backbone(self) -> Backbone:
        return self.student.backbone
