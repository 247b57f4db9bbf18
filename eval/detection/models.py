"""Faster R-CNN (torchvision) on our backbones, with the same head for ResNets and ViTs.

Both feature extractors return an ``OrderedDict`` of 256-channel maps ``"0"``-``"3"`` (strides
4/8/16/32 for a standard ResNet stem or a ViT) plus ``"pool"`` (stride 64, max-pooled from
``"3"``), which is what the anchor generator (one size per level, 32-512 px, ratios 0.5/1/2) and
``MultiScaleRoIAlign(["0", "1", "2", "3"])`` expect — torchvision's ``fasterrcnn_resnet50_fpn``
layout.

* **ResNet** (:func:`resnet_fpn`): torchvision ``BackboneWithFPN`` over ``layer1``-``layer4``.
  BatchNorm layers become ``FrozenBatchNorm2d`` (their running statistics and affine parameters
  are fixed, as in Detectron2 / torchvision detection: batches of 2 images cannot estimate
  statistics). ``trainable_layers`` (0-5, counted from ``layer4`` down to the stem) are
  fine-tuned, the rest frozen; 0 freezes the whole backbone (the FPN is always trained).
* **ViT** (:class:`SimpleFeaturePyramid`): the ViTDet simple pyramid (Li et al. 2022): the last
  block's patch tokens reshaped to a stride-``patch`` map, then per level deconvolutions (up) or
  max-pooling (down) to strides 4/8/16/32, each followed by a 1x1 and a 3x3 conv with
  ``LayerNorm2d`` (256 channels). The ViT is rebuilt with ``dynamic_img_size=True`` (same weights;
  position embeddings interpolated to each padded batch size).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pretrain.backbones import Backbone, build_backbone

FPN_CHANNELS = 256
LEVELS = ("0", "1", "2", "3")  # strides 4, 8, 16, 32; "pool" (stride 64) comes on top
STRIDES = (4, 8, 16, 32)
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # trainable_layers order


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place; returned) by a ``FrozenBatchNorm2d``
    holding its statistics and affine parameters."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def resnet_fpn(backbone: Backbone, trainable_layers: int = 5) -> BackboneWithFPN:
    """``BackboneWithFPN`` over a copy of ``backbone.net``'s layer1-4 (see the module docstring)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    net = freeze_batchnorm(copy.deepcopy(backbone.net))
    train = RESNET_STAGES[:trainable_layers]
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(train) if train else False)
    c = backbone.embed_dim  # layer4 channels; layer1-3 have 1/8, 1/4, 1/2 of them
    return BackboneWithFPN(
        net,
        return_layers={f"layer{i + 1}": level for i, level in enumerate(LEVELS)},
        in_channels_list=[c // 8, c // 4, c // 2, c],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )


def _resample(dim: int, patch: int, stride: int) -> tuple[nn.Module, int]:
    """Stride ``patch`` -> ``stride``: ViTDet's deconvs (2x each, halving channels, LN + GELU in
    between) or 2x2 max-pools; returns the module and its output channels."""
    steps = math.log2(patch / stride)
    if steps != int(steps):
        raise ValueError(f"patch size {patch} and stride {stride} are not a power of 2 apart")
    layers: list[nn.Module] = []
    for i in range(int(steps)):
        if i:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
    layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(int(-steps))]
    return nn.Sequential(*layers), dim


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on a timm ViT: ``[B, 3, H, W]`` (H, W multiples of the
    patch size) -> ``{"0": [B, 256, H/4, W/4], ..., "3": [B, 256, H/32, W/32], "pool": H/64}``."""

    def __init__(self, vit: nn.Module, out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.vit = vit
        self.patch = vit.patch_embed.patch_size[0]
        self.prefix = vit.num_prefix_tokens
        self.out_channels = out_channels  # read by FasterRCNN
        self.levels = nn.ModuleDict()
        for level, stride in zip(LEVELS, STRIDES, strict=True):
            resample, dim = _resample(vit.embed_dim, self.patch, stride)
            self.levels[level] = nn.Sequential(
                resample,
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        b, _, h, w = x.shape
        tokens = self.vit.forward_features(x)[:, self.prefix :]  # [B, N, D]
        fmap = tokens.transpose(1, 2).reshape(b, -1, h // self.patch, w // self.patch)
        out = OrderedDict((level, block(fmap)) for level, block in self.levels.items())
        out["pool"] = F.max_pool2d(out[LEVELS[-1]], kernel_size=1, stride=2)  # stride 64
        return out


def dynamic_vit(backbone: Backbone) -> nn.Module:
    """A copy of ``backbone.net`` that accepts any input size (timm ``dynamic_img_size``)."""
    cfg = copy.deepcopy(backbone.cfg)
    cfg.kwargs = {**cfg.kwargs, "dynamic_img_size": True}
    net = build_backbone(cfg).net
    net.load_state_dict(backbone.net.state_dict())
    return net


def feature_extractor(backbone: Backbone, frozen: bool, trainable_layers: int = 5) -> nn.Module:
    """The multi-scale feature extractor for ``backbone`` (module docstring); ``frozen``
    freezes the backbone weights (the pyramid / FPN is trained either way)."""
    if backbone.family == "resnet":
        return resnet_fpn(backbone, 0 if frozen else trainable_layers)
    if backbone.family == "vit":
        vit = dynamic_vit(backbone)
        vit.requires_grad_(not frozen)
        return SimpleFeaturePyramid(vit)
    raise ValueError(f"no detection feature extractor for a {backbone.family!r} backbone")


def build_detector(
    backbone: Backbone,
    num_classes: int,
    *,
    frozen: bool = False,
    trainable_layers: int = 5,
    min_size: int = 320,
    max_size: int = 512,
    mean: tuple[float, ...] | list[float] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] | list[float] = (0.229, 0.224, 0.225),
) -> FasterRCNN:
    """torchvision ``FasterRCNN`` over :func:`feature_extractor`; ``num_classes`` counts the
    background. Images are resized (shorter side ``min_size``, longer at most ``max_size``) and
    normalised with ``mean`` / ``std`` (0-1 units) by the model's transform."""
    anchors = AnchorGenerator(
        sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5
    )
    return FasterRCNN(
        feature_extractor(backbone, frozen, trainable_layers),
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(
            featmap_names=list(LEVELS), output_size=7, sampling_ratio=2
        ),
    )
