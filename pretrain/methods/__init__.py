"""Method registry: name → (method class, config class). Adding a method is one line here."""

from __future__ import annotations

from pretrain.backbones import Backbone
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.methods.mocov3 import MoCoV3, MoCoV3Config
from pretrain.methods.simclr import SimCLR, SimCLRConfig

METHODS: dict[str, tuple[type[Method], type[MethodConfig]]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "mocov3": (MoCoV3, MoCoV3Config),
}
MethodConfig.registry.update({name: cfg for name, (_, cfg) in METHODS.items()})


def build_method(cfg: MethodConfig, backbone: Backbone) -> Method:
    """Instantiate the method named by ``cfg.name`` around ``backbone``."""
    method_cls, _ = METHODS[cfg.name]
    return method_cls(cfg, backbone)


__all__ = ["METHODS", "LossOutput", "Method", "MethodConfig", "StepState", "build_method"]
