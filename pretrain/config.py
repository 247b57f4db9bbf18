"""The pretraining config: one typed dataclass per component, assembled here.

``load_config(recipe, overrides)`` reads a recipe YAML (only what differs from the defaults),
applies ``a.b=c`` overrides last, and builds the typed tree; an unknown key, a wrong type or an
impossible combination raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pretrain.backbones import BackboneConfig
from pretrain.data.views import AugConfig
from pretrain.engine.base import EngineConfig
from pretrain.methods import MethodConfig
from pretrain.optim import OptimConfig
from pretrain.typed_config import ConfigError, build, parse_override, set_by_path, to_dict


@dataclass
class RunConfig:
    """``total_steps`` is the schedule length; ``stop_after`` saves a checkpoint and exits
    after that step (a later start resumes). ``global_batch_size`` counts images (not views)
    over all ranks."""

    dir: str = "runs/default"
    seed: int = 0
    total_steps: int = 1000
    stop_after: int | None = None
    global_batch_size: int = 256
    export: bool = True

    def validate(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"run.total_steps: must be >= 1, got {self.total_steps}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.total_steps:
            raise ValueError(
                f"run.stop_after: must be in [1, run.total_steps={self.total_steps}], "
                f"got {self.stop_after}"
            )
        if self.global_batch_size < 1:
            raise ValueError(f"run.global_batch_size: must be >= 1, got {self.global_batch_size}")


@dataclass
class DataConfig:
    """``train``: a shard directory written by ``python -m data_prep write``. ``pipeline``:
    where images are decoded and augmented (:mod:`pretrain.data.pipeline`): ``workers`` (PIL +
    torchvision per sample in the loader workers), ``device`` (workers read bytes and draw the
    parameters; batched decode and augmentation on the training device), ``auto`` (``device``
    on CUDA, else ``workers``). Both give the same views for the same sample and seed, up to
    interpolation and rounding. ``decode`` (device pipeline only): ``device`` (batched, nvJPEG
    on CUDA) or ``workers`` (the workers decode on the CPU and ship pixels; for small images)."""

    train: str = ""
    num_workers: int = 4
    shuffle_buffer: int = 2000
    pipeline: Literal["auto", "workers", "device"] = "auto"
    decode: Literal["device", "workers"] = "device"
    aug: AugConfig = field(default_factory=AugConfig)

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 3

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint.every: must be >= 1, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclass
class LogConfig:
    """``sample_keys``: every rank appends the (epoch, index) of each sample it trains on to
    ``run.dir/samples/rank-<r>.jsonl`` (for auditing data order across resumes)."""

    every: int = 10
    tensorboard: bool = True
    sample_keys: bool = False

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every: must be >= 1, got {self.every}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_config(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Recipe YAML + ``a.b=c`` overrides → validated :class:`Config`."""
    tree: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path}: no such file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"recipe {path}: invalid YAML ({' '.join(str(exc).split())})"
            ) from None
    for text in overrides:
        key, value = parse_override(text)
        set_by_path(tree, key, value)
    return build(Config, tree)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["Config", "ConfigError", "config_to_yaml", "load_config", "to_dict"]
