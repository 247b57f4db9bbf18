"""MAE's per-sample random masking (He et al. 2022, §3 and ``random_masking`` of the
official code): shuffle the patches by ``argsort`` of uniform noise, keep the first
``len_keep = int(N · (1 − mask_ratio))``.
"""

from __future__ import annotations

import torch
from torch import nn


def random_masking(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masking from uniform ``noise [B, N]`` (small noise = kept).

    Returns:
        ids_keep: ``[B, len_keep]`` indices of the visible patches, in shuffled order.
        mask: ``[B, N]`` 1 for a masked patch, 0 for a visible one (in the original order).
        ids_restore: ``[B, N]`` the inverse permutation: ``shuffled.gather(1, ids_restore)``
            puts the shuffled sequence back into patch order.
    """
    b, n = noise.shape
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, len_keep]
    mask = torch.ones(b, n, dtype=noise.dtype, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] back in patch order
    return ids_keep, mask, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]``, ``ids [B, M]`` → ``[B, M, D]`` (tokens picked per sample)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, N, p·p·C]`` in row-major patch order, pixels as (p, p, C)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def vit_forward_visible(vit: nn.Module, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Run a timm ``VisionTransformer`` on the visible patches only (MAE's encoder).

    Patch embedding and position embedding on all ``N`` patches, keep ``ids_keep [B, M]``,
    prepend the prefix tokens (cls, registers) with their position embedding, then the ViT's
    ``norm_pre``, blocks and final norm. With ``ids_keep = arange(N)`` this is
    ``vit.forward_features(imgs)``.

    Returns: ``[B, prefix + M, D]``.
    """
    x = vit.patch_embed(imgs)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, D] (also for NHWC patch embeds)
    b = x.shape[0]
    n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if vit.pos_embed is not None:
        x = x + vit.pos_embed[:, n_pos_prefix:]
    x = gather_tokens(x, ids_keep)  # [B, M, D]
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if prefix:
        tokens = torch.cat(prefix, dim=1)  # [B, prefix, D]
        if vit.pos_embed is not None and n_pos_prefix:
            tokens = tokens + vit.pos_embed[:, :n_pos_prefix]
        x = torch.cat([tokens, x], dim=1)
    x = vit.norm_pre(vit.pos_drop(x))
    return vit.norm(vit.blocks(x))
