"""MAE's light decoder (He et al. 2022, §3): mask tokens + fixed 2-D sin-cos position embedding,
a few Transformer blocks, and a linear pixel predictor per patch."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretrain.modules.masking import gather_tokens


def sincos_pos_embed_2d(dim: int, grid: int, prefix: int = 1) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding ``[1, prefix + grid², dim]`` (zeros for prefix tokens).

    Half the channels encode the row, half the column; each half is ``[sin(p ω), cos(p ω)]``
    with ``ω_i = 1 / 10000^(i / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [grid², dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid², dim/2]

    # The official code puts the column (w) embedding first.
    emb = torch.cat([embed(cols), embed(rows)], dim=1)  # [grid², dim]
    emb = torch.cat([torch.zeros(prefix, dim, dtype=emb.dtype), emb])
    return emb.unsqueeze(0).float()


_layer_norm = partial(nn.LayerNorm, eps=1e-6)


class MAEDecoder(nn.Module):
    """Encoder tokens ``[B, 1 + M, D]`` + ``ids_restore [B, N]`` → pixels ``[B, N, p·p·3]``."""

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        grid = int(round(num_patches**0.5))
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                for _ in range(depth)
            ]
        )
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # [B, 1 + M, dim]
        b, n = ids_restore.shape
        masks = self.mask_token.expand(b, n + 1 - x.shape[1], -1)  # [B, N - M, dim]
        patches = torch.cat([x[:, 1:], masks], dim=1)  # [B, N, dim] shuffled order
        patches = gather_tokens(patches, ids_restore)  # [B, N, dim] patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])  # [B, N, p·p·3]


def init_mae_weights(m: nn.Module) -> None:
    """The official init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
