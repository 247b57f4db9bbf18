"""Export contract: ``export/backbone.safetensors`` (plain backbone weights) + ``backbone.yaml``.

The safetensors keys are those of the plain torchvision / timm module (``Backbone.net``), so::

    import timm, yaml
    from safetensors.torch import load_file
    spec = yaml.safe_load(open("export/backbone.yaml"))
    model = timm.create_model(spec["timm_name"], **spec["timm_kwargs"])   # ViTs
    model.load_state_dict(load_file("export/backbone.safetensors"))

For ResNets ``backbone.yaml`` names the torchvision constructor; with ``cifar_stem: true`` the
stem is a 3x3 stride-1 conv and ``maxpool``/``fc`` are ``nn.Identity`` (see the README).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from pretrain.backbones import RESNETS, Backbone, BackboneConfig, build_backbone, timm_kwargs

WEIGHTS_NAME = "backbone.safetensors"
SPEC_NAME = "backbone.yaml"


def backbone_spec(backbone: Backbone) -> dict[str, Any]:
    """What ``backbone.yaml`` holds: our config plus how to build it in plain timm/torchvision."""
    cfg = backbone.cfg
    spec: dict[str, Any] = {
        "family": backbone.family,
        "embed_dim": backbone.embed_dim,
        "backbone": dict(vars(cfg)),
    }
    if cfg.name in RESNETS:
        spec["torchvision_name"] = cfg.name
    else:
        spec["timm_name"] = cfg.name
        spec["timm_kwargs"] = timm_kwargs(cfg)
    return spec


def export_backbone(
    backbone: Backbone, out_dir: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write ``out_dir/backbone.safetensors`` and ``backbone.yaml`` atomically (as one directory)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.net.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_NAME))
    spec = backbone_spec(backbone) | (extra or {})
    (tmp / SPEC_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_exported_backbone(export_dir: str | os.PathLike) -> Backbone:
    """Rebuild a :class:`Backbone` from an export directory (strict key match)."""
    export_dir = Path(export_dir)
    spec = yaml.safe_load((export_dir / SPEC_NAME).read_text())
    backbone = build_backbone(BackboneConfig(**spec["backbone"]))
    backbone.net.load_state_dict(load_file(str(export_dir / WEIGHTS_NAME)))
    return backbone
