"""Backbone + projector: the online branch that EMA teachers (BYOL, MoCo v3) mirror."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.backbones import Backbone


class Encoder(nn.Module):
    """``[b, 3, H, W] -> [b, dim]``: ``projector(backbone(x))``."""

    def __init__(self, backbone: Backbone, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))  # [b, dim]


class PerViewEncoder(Encoder):
    """The same, called on a list of views one at a time (BN statistics per view, as in the
    Barlow Twins and VICReg papers): ``V × [b, 3, H, W] -> V × [b, dim]``."""

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        return [self.projector(self.backbone(v)) for v in views]
