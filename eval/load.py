"""Loading backbones to evaluate: our export format (``backbone.yaml`` + ``backbone.safetensors``).

``--backbone`` may name the export directory or the ``backbone.safetensors`` file inside it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from pathlib import Path

import torch
import yaml

from eval.results import short_path
from pretrain.backbones import Backbone, build_backbone
from pretrain.export import SPEC_NAME, WEIGHTS_NAME, load_exported_backbone

log = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """A user-facing input problem (missing path, unlabelled data); the CLI exits 2 on it."""


def resolve_export_dir(path: str | os.PathLike) -> Path:
    """The export directory for ``path`` (the directory itself or its ``backbone.safetensors``)."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_NAME:
        p = p.parent
    if not p.exists():
        raise EvalInputError(f"backbone path does not exist: {path}")
    for name in (SPEC_NAME, WEIGHTS_NAME):
        if not (p / name).is_file():
            raise EvalInputError(f"{p} is not a backbone export: {name} is missing")
    return p


def load_backbone(path: str) -> tuple[Backbone, str]:
    """Load an exported backbone (strict key match) and a display name for result tables."""
    export_dir = resolve_export_dir(path)
    backbone = load_exported_backbone(export_dir)
    log.info("loaded %s backbone %s from %s", backbone.family, backbone.cfg.name, export_dir)
    return backbone, short_path(export_dir.resolve())


def export_spec(path: str | os.PathLike) -> dict:
    """The export's ``backbone.yaml`` (architecture, and the training input size / mean / std)."""
    return yaml.safe_load((resolve_export_dir(path) / SPEC_NAME).read_text())


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
    """Hex sha256 of the export's ``backbone.safetensors`` (``path``: directory or the file)."""
    return file_sha256(resolve_export_dir(path) / WEIGHTS_NAME)
