"""Layer-wise learning-rate decay for ViTs (BEiT, Bao et al. 2022; MAE fine-tuning).

Layer ids: 0 for the patch embedding, cls/register tokens and position embedding; ``i + 1`` for
``blocks.i``; ``L + 1`` for everything after the blocks (final norm, heads, and any parameter
outside the ViT). A group's ``lr_scale = decay^(L + 1 − layer_id)``, so the last layer trains at
the full lr and the patch embedding at ``decay^(L + 1)``. Combined with the usual split: 1-D
parameters (biases, norms) and timm's ``no_weight_decay()`` tokens get no weight decay and no trust-ratio adaptation.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

EMBED_NAMES = ("patch_embed", "cls_token", "reg_token", "pos_embed")


def find_vit(model: nn.Module) -> tuple[str, VisionTransformer]:
    """The first timm ``VisionTransformer`` inside ``model`` and its name prefix (``a.b.``)."""
    for name, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            return (name + "." if name else ""), module
    raise ValueError("optim.layer_decay: needs a timm ViT in the model, found none")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a parameter named relative to the ViT (``blocks.3.attn.qkv.weight`` → 4)."""
    if name.split(".")[0] in EMBED_NAMES:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_param_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """One group per (layer id, decay or not), each with its ``lr_scale`` and ``layer_id``."""
    prefix, vit = find_vit(model)
    num_layers = len(vit.blocks)
    skip = {prefix + n for n in vit.no_weight_decay()}  # pos_embed, cls_token (timm's list)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inside = name.startswith(prefix)
        layer = vit_layer_id(name[len(prefix) :], num_layers) if inside else num_layers + 1
        decays = p.ndim > 1 and name not in skip
        key = (layer, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "trust_adaptation": decays,
                "lr_scale": decay ** (num_layers + 1 - layer),
                "layer_id": layer,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
