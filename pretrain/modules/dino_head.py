"""DINO's projection head and the multi-crop backbone call (Caron et al. 2021, §3.1 and the
official ``DINOHead`` / ``MultiCropWrapper``); SwAV uses the same multi-crop grouping.

Head: ``nlayers`` Linear layers (GELU between, no BN by default) down to a ``bottleneck_dim``
code, L2-normalised, then a weight-normalised Linear (no bias) to ``out_dim`` whose magnitude
``g`` is fixed to 1 when ``norm_last_layer`` (the paper's default for stability).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``y = x Wᵀ`` with ``W = g · V / ‖V‖`` row-wise (``torch.nn.utils.weight_norm``, dim 0).

    Parameters ``weight_v [out, in]`` (initialised as ``nn.Linear``) and ``weight_g [out, 1]``
    (filled with 1; frozen when ``fix_norm``).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)  # [n, out]


class DINOHead(nn.Module):
    """``[n, in_dim] → [n, out_dim]``: MLP → L2-normalise → weight-normalised last layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # the official init: trunc normal std 0.02, zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)  # [n, bottleneck]
        return self.last_layer(x)  # [n, out_dim]


def multi_crop_features(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all views, crop-major ``[V * b, D]``.

    Consecutive views of the same resolution are concatenated into one backbone call (DINO's
    ``MultiCropWrapper``): one call for the global crops, one for the local crops.
    """
    outputs, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.append(backbone(torch.cat(views[start:end])))  # [(end - start) * b, D]
        start = end
    return torch.cat(outputs)
