"""Engines: how a single-device method is distributed, autocast, stepped and saved.

``build_engine(cfg, dist_info, device)`` returns the engine named by ``engine.name``. Only
``ddp`` exists so far; ``fsdp`` and ``deepspeed`` plug in behind the same interface.
"""

from __future__ import annotations

from pretrain.engine.base import Engine, EngineConfig
from pretrain.engine.ddp import DDPEngine


def build_engine(cfg: EngineConfig, device) -> Engine:
    if cfg.name == "ddp":
        return DDPEngine(cfg, device)
    raise NotImplementedError(f"engine.name: {cfg.name!r} is not available yet (only 'ddp')")


__all__ = ["DDPEngine", "Engine", "EngineConfig", "build_engine"]
