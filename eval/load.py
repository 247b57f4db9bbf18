"""Loading the backbone that ``--backbone PATH [--arch NAME]`` names (every eval command).

``PATH`` may be:

* **our export**: a directory with ``backbone.yaml`` + ``backbone.safetensors``, or that file;
* **our training checkpoint**: a run directory (its newest complete ``checkpoints/step-N``; an
  ``export/`` only when it has no checkpoint) or one ``checkpoints/step-N`` directory (or its
  ``state.pt``), saved by any engine. The method is rebuilt from the config saved in
  ``state.pt``, its consolidated state loaded (:func:`plain_model_state`, no process group needed)
  and ``export_backbone()`` taken: the teacher for teacher methods, exactly what an export of that
  checkpoint holds;
* **a released checkpoint file** of another code base (DINO, MAE, MoCo v2/v3, SwAV, Barlow Twins,
  VICReg, timm, torchvision; ``.pth``/``.pt``/``.pth.tar``/``.safetensors``): see
  ``eval/formats.py``. ``--arch`` names its architecture where the file does not.

Exports and training checkpoints name their own architecture; ``--arch`` is ignored for them (with
a warning).

``weights_sha256`` identifies the input: an export's ``backbone.safetensors``; a file itself; for
a training checkpoint ``state.pt`` when it is the only weights file (DDP), else the sha256 of a
``sha256sum``-style manifest (``"<sha256>  <relative path>\\n"`` per file, sorted by path) of
``state.pt`` and every file under the engine's shard directories (``dcp/``, ``deepspeed/``); the
per-rank RNG files and ``meta.json`` are left out. ``export_spec`` gives an export's
``backbone.yaml``, for a training checkpoint the ``backbone.yaml`` its export would have, and
``{}`` for other files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from eval.errors import EvalInputError
from eval.formats import load_file_backbone
from eval.results import short_path
from pretrain import checkpoint as ckpt
from pretrain.backbones import Backbone, build_backbone
from pretrain.config import Config, ConfigError
from pretrain.engine import plain_model_state
from pretrain.export import SPEC_NAME, WEIGHTS_NAME, backbone_spec, load_exported_backbone
from pretrain.methods import build_method
from pretrain.train import export_extra
from pretrain.typed_config import build

__all__ = [
    "EvalInputError",
    "add_backbone_args",
    "checkpoint_path",
    "export_spec",
    "file_sha256",
    "load_backbone",
    "random_init_like",
    "resolve_export_dir",
    "resolve_source",
    "weights_sha256",
]

log = logging.getLogger(__name__)

STATE_NAME = "state.pt"


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """``--backbone PATH [--arch NAME]``, the same for every eval command."""
    parser.add_argument(
        "--backbone",
        required=True,
        metavar="PATH",
        help="what to evaluate: an export directory (backbone.yaml + backbone.safetensors) or its "
        "backbone.safetensors; a training run directory (its newest checkpoint) or a "
        "checkpoints/step-N directory; or a released checkpoint file (.pth, .pt, .pth.tar, "
        ".safetensors) of DINO, MAE, MoCo v2/v3, SwAV, Barlow Twins, VICReg, timm or torchvision",
    )
    parser.add_argument(
        "--arch",
        default=None,
        metavar="NAME",
        help="architecture of a checkpoint file that does not name it: a torchvision ResNet "
        "(resnet50) or a timm model name (vit_small_patch16_224), optionally NAME:key=value,... "
        "for timm/torchvision arguments (vit_small_patch16_224:num_heads=12 for MoCo v3 ViT-S); "
        "ResNets are recognised from their weights, a ViT's image and patch size from its "
        "shapes; wins over what a file says; exports and our checkpoints name their own",
    )


@dataclass(frozen=True)
class Source:
    """What ``--backbone`` resolved to: ``kind`` "export" (``path``: the export directory),
    "checkpoint" (the ``checkpoints/step-N`` directory) or "file" (the checkpoint file)."""

    kind: str
    path: Path


def resolve_source(path: str | os.PathLike) -> Source:
    """Recognise ``path`` (see the module docstring); :class:`EvalInputError` when nothing fits."""
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"backbone path does not exist: {path}")
    if p.is_file():
        if p.name == WEIGHTS_NAME and (p.parent / SPEC_NAME).is_file():
            return Source("export", p.parent)
        if p.name == STATE_NAME and (p.parent / "meta.json").is_file():
            return Source("checkpoint", p.parent)
        return Source("file", p)
    if _is_export(p):
        return Source("export", p)
    if (p / STATE_NAME).is_file() and (p / "meta.json").is_file():
        return Source("checkpoint", p)
    if (p / "checkpoints").is_dir() or _is_export(p / "export"):
        latest = ckpt.latest_checkpoint(p)
        if latest is not None:
            return Source("checkpoint", latest)
        if _is_export(p / "export"):
            return Source("export", p / "export")
        raise EvalInputError(f"{p}: a training run without a complete checkpoint or an export")
    raise EvalInputError(
        f"{p} is neither an export directory ({SPEC_NAME} + {WEIGHTS_NAME}), a training run "
        f"directory (checkpoints/), a checkpoints/step-N directory ({STATE_NAME} + meta.json) "
        "nor a checkpoint file"
    )


def load_backbone(path: str | os.PathLike, arch: str | None = None) -> tuple[Backbone, str]:
    """The backbone ``path`` names (strict key match) and a display name for result tables."""
    source = resolve_source(path)
    if source.kind == "file":
        backbone, _ = load_file_backbone(source.path, arch)
        return backbone, short_path(source.path.resolve())
    if arch is not None:
        log.warning("--arch %s ignored: %s names its own architecture", arch, source.path)
    if source.kind == "export":
        backbone = load_exported_backbone(source.path)
        name = short_path(source.path.resolve())
    else:
        backbone = load_checkpoint_backbone(source.path)
        name = checkpoint_name(source.path)
    log.info("loaded %s backbone %s from %s", backbone.family, backbone.cfg.name, source.path)
    return backbone, name


def load_checkpoint_backbone(step_dir: Path) -> Backbone:
    """Rebuild the method of training checkpoint ``step_dir`` (any engine) on the CPU, load its
    state and return ``method.export_backbone()``."""
    state = _read_state(step_dir)
    cfg = _checkpoint_config(step_dir, state)
    model_state = plain_model_state(step_dir, ckpt.read_meta(step_dir)["engine"], state)
    method = build_method(cfg.method, build_backbone(cfg.backbone))
    method.load_state_dict(model_state)
    return method.export_backbone()


def checkpoint_name(step_dir: Path) -> str:
    """``runs/dino-r18/checkpoints/step-400 -> "dino-r18/step-400"``."""
    return f"{step_dir.resolve().parent.parent.name}/{step_dir.name}"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The resolved location a result record names: export directory, step directory or file."""
    return resolve_source(path).path.resolve()


def export_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The export's ``backbone.yaml`` (architecture, training input size / mean / std); for a
    training checkpoint the one its export would have; ``{}`` for other checkpoint files."""
    source = resolve_source(path)
    if source.kind == "export":
        return yaml.safe_load((source.path / SPEC_NAME).read_text())
    if source.kind == "file":
        return {}
    state = _read_state(source.path)
    cfg = _checkpoint_config(source.path, state)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        backbone = build_backbone(cfg.backbone)
    return backbone_spec(backbone) | export_extra(cfg, state["step"])


def resolve_export_dir(path: str | os.PathLike) -> Path:
    """The export directory for ``path`` (the directory itself or its ``backbone.safetensors``)."""
    source = resolve_source(path)
    if source.kind != "export":
        raise EvalInputError(f"{path} is not a backbone export ({SPEC_NAME} + {WEIGHTS_NAME})")
    return source.path


def random_init_like(backbone: Backbone, seed: int = 0) -> Backbone:
    """The same architecture at random initialisation, seeded (``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    return build_backbone(copy.deepcopy(backbone.cfg))


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 identifying the weights ``path`` names (see the module docstring)."""
    source = resolve_source(path)
    if source.kind == "export":
        return file_sha256(source.path / WEIGHTS_NAME)
    if source.kind == "file":
        return file_sha256(source.path)
    shards = sorted(f for d in source.path.iterdir() if d.is_dir() for f in d.rglob("*"))
    files = [source.path / STATE_NAME] + [f for f in shards if f.is_file()]
    if len(files) == 1:
        return file_sha256(files[0])
    manifest = "".join(
        f"{file_sha256(f)}  {f.relative_to(source.path).as_posix()}\n" for f in files
    )
    return hashlib.sha256(manifest.encode()).hexdigest()


def _is_export(p: Path) -> bool:
    return (p / SPEC_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def _read_state(step_dir: Path) -> dict[str, Any]:
    """``state.pt`` memory-mapped (the optimizer state in it is never read)."""
    return torch.load(step_dir / STATE_NAME, map_location="cpu", weights_only=True, mmap=True)


def _checkpoint_config(step_dir: Path, state: dict[str, Any]) -> Config:
    """The resolved training config saved in the checkpoint, as the typed :class:`Config`."""
    try:
        return build(Config, state["config"])
    except (ConfigError, KeyError) as exc:
        raise EvalInputError(f"{step_dir}: its saved config does not build here ({exc})") from None
