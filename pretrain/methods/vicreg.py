"""VICReg (Bardes, Ponce, LeCun 2022): invariance, variance and covariance terms on the
expander outputs of the two views (:func:`vicreg_loss`), statistics over the global batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.backbones import Backbone
from pretrain.losses.redundancy import vicreg_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.encoder import PerViewEncoder
from pretrain.modules.heads import mlp


@dataclass
class VICRegConfig(MethodConfig):
    """Paper defaults: 3-layer expander 8192-8192-8192 (BN + ReLU between),
    ``λ = μ = 25`` (invariance, variance), ``ν = 1`` (covariance)."""

    name: str = "vicreg"
    hidden_dim: int = 8192
    dim: int = 8192
    proj_layers: int = 3
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0


class VICReg(Method):
    views = "two_view"

    def __init__(self, cfg: VICRegConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        projector = mlp(backbone.embed_dim, cfg.hidden_dim, cfg.dim, cfg.proj_layers)
        self.student = PerViewEncoder(backbone, projector)

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        z1, z2 = self.run_student(views)  # [b, dim] each
        c = self.cfg
        terms = vicreg_loss(z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff)
        logs = {
            "invariance": terms.invariance.detach(),
            "variance": terms.variance.detach(),
            "covariance": terms.covariance.detach(),
        }
        return LossOutput(terms.loss, logs, embeddings=z1.detach())

    def export_backbone(self) -> Backbone:
        return self.student.backbone
