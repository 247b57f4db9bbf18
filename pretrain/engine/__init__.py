"""Engines: how a single-device method is distributed, autocast, stepped and saved.

``build_engine(cfg, device)`` returns the engine named by ``engine.name``: ``ddp`` (replicated),
``fsdp`` (FSDP2, ``fully_shard``) or ``deepspeed`` (ZeRO 1/2/3). ``plain_model_state`` reads the
consolidated ``method.state_dict()`` back from any engine's checkpoint without a process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.engine.base import Engine, EngineConfig
from pretrain.engine.ddp import DDPEngine


def build_engine(cfg: EngineConfig, device: torch.device) -> Engine:
    if cfg.name == "ddp":
        return DDPEngine(cfg, device)
    if cfg.name == "fsdp":
        from pretrain.engine.fsdp import FSDPEngine

        return FSDPEngine(cfg, device)
    if cfg.name == "deepspeed":
        from pretrain.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, device)
    raise ValueError(f"engine.name: {cfg.name!r} is not one of ['ddp', 'fsdp', 'deepspeed']")


def check_engine_supports(engine_cfg: EngineConfig, method_cfg: Any) -> None:
    """Refuse (``ValueError``, before any work) a method setting the engine cannot run."""
    if engine_cfg.name == "deepspeed":
        from pretrain.engine.deepspeed import check_supported
        from pretrain.methods import METHODS

        check_supported(method_cfg, METHODS[method_cfg.name][0])


def plain_model_state(
    directory: Path, engine_name: str, state: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The full ``method.state_dict()`` (CPU) of checkpoint ``directory`` saved by
    ``engine_name``; ``state`` is its loaded ``state.pt``. Needs no process group."""
    if engine_name == "ddp":
        return state["model"]
    if engine_name == "fsdp":
        from pretrain.engine.fsdp import load_plain_model_state

        return load_plain_model_state(directory, state)
    if engine_name == "deepspeed":
        from pretrain.engine.deepspeed import load_plain_model_state

        return load_plain_model_state(directory, state)
    raise ValueError(f"{directory}: saved by an unknown engine {engine_name!r}")


__all__ = [
    "DDPEngine",
    "Engine",
    "EngineConfig",
    "build_engine",
    "check_engine_supports",
    "plain_model_state",
]
