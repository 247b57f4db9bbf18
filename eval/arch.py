"""Which architecture to build for a checkpoint file that is not one of our exports.

``--arch NAME[:key=value,...]``: a torchvision ResNet or a timm model name;
``cifar_stem``, ``img_size``, ``patch_size``, ``drop_path_rate`` set our :class:`BackboneConfig`,
other keys go to timm / torchvision (values read as YAML). Without ``--arch`` the file's own words
are used where it has them (MoCo's ``arch``; DINO's ``args.arch`` + ``args.patch_size``; MAE's
``args.model``), else a ResNet is recognised from its weights (block counts, stem). A ViT is never
guessed from weights alone: its head count is not in them (MoCo v3's ViT-S has 12 heads where
timm's ``vit_small_patch16_224`` has 6). Left unset, a ViT's ``img_size`` / ``patch_size`` are read
from the ``pos_embed`` / ``patch_embed`` shapes and a ResNet's ``cifar_stem`` from the ``conv1``
kernel. ``--arch`` always wins over what the file says (a disagreement is logged).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from eval.errors import EvalInputError
from pretrain.backbones import RESNETS, BackboneConfig

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]

CONFIG_FIELDS = ("cifar_stem", "img_size", "patch_size", "drop_path_rate")
# ViTs as their authors name them in the files they save → timm name and arguments.
MOCO_V3_VITS = {  # moco-v3 vits.py: ViT-S has 12 heads (timm's vit_small has 6)
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),
    "vit_base": ("vit_base_patch16_224", {}),
}
DINO_VITS = {  # dino vision_transformer.py: same widths, depths and heads as timm's
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
MAE_VITS = {  # mae models_mae.py (the encoder; heads as timm's)
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}
RESNET_BLOCKS = {  # (bottleneck blocks, blocks per stage) → torchvision name
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}
ARCH_EXAMPLES = (
    "a torchvision ResNet such as resnet50, or a timm model name such as vit_small_patch16_224 "
    "(DINO ViT-S/16), vit_base_patch16_224 (MAE ViT-B/16) or "
    "vit_small_patch16_224:num_heads=12 (MoCo v3 ViT-S)"
)


def choose_config(path: Path, obj: Any, states: list[State], arch: str | None) -> BackboneConfig:
    """``--arch``, else what the file says, else a ResNet recognised from its weights; unset
    geometry (ViT input / patch size, ResNet stem) is then read from the weights."""
    named = file_arch(obj)
    explicit: set[str] = set()
    if arch is not None:
        cfg, explicit = parse_arch(arch)
        if named is not None and (named[0].name, named[0].kwargs) != (cfg.name, cfg.kwargs):
            log.warning(
                "%s says %s (%s); --arch %s wins", path.name, named[1], describe(named[0]), arch
            )
    elif named is not None:
        cfg = named[0]
        log.info("%s: architecture from the file's %s", path.name, named[1])
    else:
        cfg = next((c for c in map(infer_resnet, states) if c is not None), None)
        if cfg is None:
            vit = any(map(looks_like_vit, states))
            what = (
                "a ViT (its head count is not in the weights)"
                if vit
                else "an architecture not recognised from its weights"
            )
            raise EvalInputError(
                f"{path}: the file does not name its architecture and holds {what}: "
                f"pass --arch NAME, {ARCH_EXAMPLES}"
            )
        explicit = {"cifar_stem"}
    return complete_config(cfg, explicit, states)


def parse_arch(text: str) -> tuple[BackboneConfig, set[str]]:
    """``NAME[:key=value,...]`` → (config, the keys it sets)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(
                f"--arch {text!r}: expected NAME or NAME:key=value,... "
                "(e.g. vit_small_patch16_224:num_heads=12)"
            )
        options[key.strip()] = yaml.safe_load(value)
    fields = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
    kwargs = {k: v for k, v in options.items() if k not in CONFIG_FIELDS}
    cfg = BackboneConfig(name=name.strip(), kwargs=kwargs, **fields)
    try:
        cfg.validate()
    except ValueError as exc:
        raise EvalInputError(f"--arch {text}: {exc}") from None
    return cfg, set(options)


def file_arch(obj: Any) -> tuple[BackboneConfig, str] | None:
    """The architecture the file names in its authors' words (MoCo ``arch``, DINO / MAE
    ``args``), as our config, with where it was read; ``None`` when it names none we know."""
    if not isinstance(obj, Mapping):
        return None
    arch = obj.get("arch")
    if isinstance(arch, str):  # MoCo v2 / v3 main_moco.py
        where = f"arch={arch!r}"
        if arch in RESNETS:
            return BackboneConfig(name=arch), where
        if arch in MOCO_V3_VITS:
            name, kwargs = MOCO_V3_VITS[arch]
            return BackboneConfig(name=name, kwargs=dict(kwargs)), where
        return None
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, Mapping):
        return None
    arch, patch, model = args.get("arch"), args.get("patch_size"), args.get("model")
    if isinstance(arch, str):  # DINO main_dino.py (it renames deit_* to vit_*)
        arch = arch.replace("deit", "vit")
        where = f"args.arch={arch!r}"
        if arch in RESNETS:
            return BackboneConfig(name=arch), where
        if arch in DINO_VITS and isinstance(patch, int):
            return BackboneConfig(name=DINO_VITS[arch], patch_size=patch), f"{where}, patch {patch}"
    mae = model.removesuffix("_dec512d8b") if isinstance(model, str) else None
    if mae in MAE_VITS:  # MAE main_pretrain.py
        return BackboneConfig(name=MAE_VITS[mae]), f"args.model={model!r}"
    return None


def complete_config(cfg: BackboneConfig, explicit: set[str], states: list[State]) -> BackboneConfig:
    """Set what nobody named from the first state dict of the same family: a ResNet's stem, a
    ViT's input and patch size."""
    for state in states:
        if cfg.name in RESNETS:
            resnet = infer_resnet(state)
            if resnet is not None:
                if "cifar_stem" not in explicit:
                    cfg.cifar_stem = resnet.cifar_stem
                return cfg
        elif looks_like_vit(state):
            for key, value in vit_geometry(state).items():
                if key not in explicit:
                    setattr(cfg, key, value)
            return cfg
    return cfg


def infer_resnet(state: State) -> BackboneConfig | None:
    """A torchvision ResNet (18 … 152, standard width) recognised from its keys and shapes."""
    conv1, first = state.get("conv1.weight"), state.get("layer1.0.conv1.weight")
    if conv1 is None or first is None or conv1.dim() != 4 or first.shape[0] != 64:
        return None
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    name = RESNET_BLOCKS.get((bottleneck, blocks))
    if name is None or conv1.shape[-1] not in (3, 7):
        return None
    return BackboneConfig(name=name, cifar_stem=conv1.shape[-1] == 3)


def looks_like_vit(state: State) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)


def vit_geometry(state: State) -> dict[str, int]:
    """``patch_size`` from the patch projection, ``img_size`` from the square ``pos_embed`` grid."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        return {}
    patch = int(proj.shape[-1])
    if pos is None or pos.dim() != 3:
        return {"patch_size": patch}
    tokens = int(pos.shape[1])
    for prefix in (1, 0) if "cls_token" in state else (0,):
        grid = math.isqrt(max(tokens - prefix, 0))
        if grid > 0 and grid * grid == tokens - prefix:
            return {"img_size": grid * patch, "patch_size": patch}
    return {"patch_size": patch}


def describe(cfg: BackboneConfig) -> str:
    """``vit_tiny_patch16_224 (img_size=32, patch_size=8)``: the name and what differs."""
    options = {k: getattr(cfg, k) for k in ("cifar_stem", "img_size", "patch_size")}
    shown = {k: v for k, v in options.items() if v not in (None, False)} | cfg.kwargs
    return cfg.name + (f" ({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
