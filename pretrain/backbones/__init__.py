"""Backbones behind one feature API: torchvision ResNets (optional CIFAR stem) and timm ViTs.

``build_backbone(cfg)`` returns a :class:`Backbone` whose ``forward(x)`` gives pooled features
``[B, embed_dim]`` and whose ``forward_features(x)`` gives the spatial map ``[B, C, h, w]``
(ResNet) or the token sequence ``[B, 1 + N, D]`` (ViT). ``backbone.net`` is the plain torchvision
or timm module, so its ``state_dict()`` loads into a fresh ``torchvision.models.resnet*`` or
``timm.create_model(...)`` unchanged (that is what ``export/backbone.safetensors`` holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass
class BackboneConfig:
    """Which network to build.

    ``name``: a torchvision ResNet (``resnet18`` … ``resnet152``) or any timm ViT name
    (``vit_small_patch16_224``, ``vit_tiny_patch16_224``, ...). ``cifar_stem`` swaps the ResNet
    stem for a 3x3 stride-1 conv without max-pool (for 32 px inputs). ``img_size`` and
    ``patch_size`` override a ViT's defaults; ``kwargs`` go to ``timm.create_model`` unchanged.
    """

    name: str = "resnet18"
    cifar_stem: bool = False
    img_size: int | None = None
    patch_size: int | None = None
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.name in RESNETS:
            if self.patch_size is not None:
                raise ValueError(f"backbone.patch_size: not a ViT option ({self.name})")
        elif self.name not in timm.list_models():
            raise ValueError(
                f"backbone.name: {self.name!r} is neither a torchvision ResNet {RESNETS} "
                "nor a timm model name"
            )
        elif self.cifar_stem:
            raise ValueError(f"backbone.cifar_stem: only for ResNets, not {self.name!r}")


class Backbone(nn.Module):
    """A feature extractor: ``forward(x: [B, 3, H, W]) -> [B, embed_dim]``."""

    def __init__(self, net: nn.Module, family: str, embed_dim: int, cfg: BackboneConfig):
        super().__init__()
        self.net = net
        self.family = family  # "resnet" | "vit"
        self.embed_dim = embed_dim
        self.cfg = cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ResNet: final feature map ``[B, C, h, w]``; ViT: tokens ``[B, prefix + N, D]``."""
        if self.family == "vit":
            return self.net.forward_features(x)
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, embed_dim]`` (ResNet: global average pool; ViT: timm's pool)."""
        return self.net(x)


def _build_resnet(cfg: BackboneConfig) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, cfg.name)(weights=None, **cfg.kwargs)
    embed_dim = net.fc.in_features
    net.fc = nn.Identity()
    if cfg.cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, embed_dim


def timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """The keyword arguments for ``timm.create_model(cfg.name, **kwargs)`` (no classifier)."""
    kw: dict[str, Any] = {"num_classes": 0, "drop_path_rate": cfg.drop_path_rate, **cfg.kwargs}
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kw["patch_size"] = cfg.patch_size
    return kw


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named by ``cfg`` with random initialisation (never downloads weights)."""
    cfg.validate()
    if cfg.name in RESNETS:
        net, dim = _build_resnet(cfg)
        return Backbone(net, "resnet", dim, cfg)
    net = timm.create_model(cfg.name, pretrained=False, **timm_kwargs(cfg))
    return Backbone(net, "vit", net.num_features, cfg)
