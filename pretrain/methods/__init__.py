"""Method registry: name → (method class, config class). Adding a method is one line here."""

from __future__ import annotations

from pretrain.backbones import Backbone
from pretrain.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.methods.byol import BYOL, BYOLConfig
from pretrain.methods.dino import DINO, DINOConfig
from pretrain.methods.mae import MAE, MAEConfig
from pretrain.methods.mocov2 import MoCoV2, MoCoV2Config
from pretrain.methods.mocov3 import MoCoV3, MoCoV3Config
from pretrain.methods.simclr import SimCLR, SimCLRConfig
from pretrain.methods.simsiam import SimSiam, SimSiamConfig
from pretrain.methods.swav import SwAV, SwAVConfig
from pretrain.methods.vicreg import VICReg, VICRegConfig

METHODS: dict[str, tuple[type[Method], type[MethodConfig]]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "dino": (DINO, DINOConfig),
    "swav": (SwAV, SwAVConfig),
    "mocov3": (MoCoV3, MoCoV3Config),
    "mocov2": (MoCoV2, MoCoV2Config),
    "mae": (MAE, MAEConfig),
    "byol": (BYOL, BYOLConfig),
    "simsiam": (SimSiam, SimSiamConfig),
    "barlow_twins": (BarlowTwins, BarlowTwinsConfig),
    "vicreg": (VICReg, VICRegConfig),
}
MethodConfig.registry.update({name: cfg for name, (_, cfg) in METHODS.items()})


def build_method(cfg: MethodConfig, backbone: Backbone) -> Method:
    """Instantiate the method named by ``cfg.name`` around ``backbone``."""
    method_cls, _ = METHODS[cfg.name]
    return method_cls(cfg, backbone)


__all__ = ["METHODS", "LossOutput", "Method", "MethodConfig", "StepState", "build_method"]
