"""MAE (He et al. 2022, "Masked autoencoders are scalable vision learners").

One view per image. Its patches are masked at random per sample (``mask_ratio = 0.75``); the
encoder (the backbone's timm ViT) sees only the visible patches (+ cls token); a light decoder
(512-d, 8 blocks, 16 heads) fills in mask tokens and predicts the pixels of every patch; the loss
is the MSE on the masked patches of per-patch normalised pixels (``norm_pix_loss``). No teacher;
the exported backbone is the encoder (a plain timm ViT).

Masking noise: the noise ``[B_global, N]`` of step ``s`` comes from a generator seeded with
``noise_seed + s``, where ``noise_seed`` is a buffer drawn from torch's RNG at construction
(after the trainer seeds it with ``run.seed``: identical on every rank, saved in checkpoints).
Each rank takes its slice of the global batch, so the masks do not depend on the number of
processes (2 × B/2 equals 1 × B exactly) and a resumed run draws the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain.backbones import Backbone
from pretrain.losses.gather import rank_offset
from pretrain.losses.mae import mae_loss
from pretrain.methods.base import LossOutput, Method, MethodConfig, StepState
from pretrain.modules.mae_decoder import MAEDecoder, init_mae_weights, sincos_pos_embed_2d
from pretrain.modules.masking import patchify, random_masking, vit_forward_visible


@dataclass
class MAEConfig(MethodConfig):
    """Paper defaults: mask 75%, decoder 512-d × 8 blocks × 16 heads, normalised-pixel targets,
    fixed sin-cos position embeddings in the encoder and the decoder."""

    name: str = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    fixed_pos_embed: bool = True

    def validate(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"method.mask_ratio: must be in (0, 1), got {self.mask_ratio}")


class MAEStudent(nn.Module):
    """Encoder (timm ViT on visible tokens) + decoder."""

    def __init__(self, backbone: Backbone, decoder: MAEDecoder, patch_size: int):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.patch_size = patch_size

    def forward(
        self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = vit_forward_visible(self.backbone.net, imgs, ids_keep)  # [B, 1 + M, D]
        return self.decoder(latent, ids_restore), latent  # [B, N, p·p·3], [B, 1 + M, D]


class MAE(Method):
    views = "single"

    def __init__(self, cfg: MAEConfig, backbone: Backbone):
        super().__init__()
        if backbone.family != "vit":
            raise ValueError(f"backbone.name: MAE needs a ViT, got {backbone.cfg.name!r}")
        self.cfg = cfg
        vit = backbone.net
        if getattr(vit, "num_prefix_tokens", 0) != 1 or vit.cls_token is None:
            raise ValueError("backbone.name: MAE needs a ViT with exactly one cls token")
        self._init_encoder(vit)
        patch = vit.patch_embed.patch_size[0]
        num_patches = vit.patch_embed.num_patches
        decoder = MAEDecoder(
            backbone.embed_dim,
            num_patches,
            patch,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
        )
        self.student = MAEStudent(backbone, decoder, patch)
        self.register_buffer("noise_seed", torch.randint(0, 2**31, ()))

    def _init_encoder(self, vit: nn.Module) -> None:
        """The official init: xavier Linear weights (patch projection as a Linear), cls token
        N(0, 0.02), and (``fixed_pos_embed``) a frozen 2-D sin-cos position embedding."""
        vit.blocks.apply(init_mae_weights)
        w = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.normal_(vit.cls_token, std=0.02)
        if self.cfg.fixed_pos_embed:
            grid = vit.patch_embed.grid_size[0]
            vit.pos_embed.data.copy_(sincos_pos_embed_2d(vit.embed_dim, grid))
            vit.pos_embed.requires_grad_(False)

    def masking_noise(self, b: int, n: int, state: StepState, device: torch.device) -> torch.Tensor:
        """This rank's rows ``[b, N]`` of the step's global noise ``[world · b, N]``."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        g = torch.Generator(device=device)
        g.manual_seed(int(self.noise_seed) + state.step)
        noise = torch.rand(world * b, n, generator=g, device=device)  # [B, N] float32
        start = rank_offset(b)
        return noise[start : start + b]

    def forward(self, views: list[torch.Tensor], state: StepState) -> LossOutput:
        imgs = views[0]  # [b, 3, H, W]
        target = patchify(imgs, self.student.patch_size)  # [b, N, p·p·3]
        noise = self.masking_noise(imgs.shape[0], target.shape[1], state, imgs.device)
        ids_keep, mask, ids_restore = random_masking(noise, self.cfg.mask_ratio)
        pred, latent = self.run_student(imgs, ids_keep, ids_restore)
        loss = mae_loss(pred, target, mask, self.cfg.norm_pix_loss)
        embeddings = latent[:, 1:].mean(dim=1).detach()  # mean of the visible tokens
        return LossOutput(loss, embeddings=embeddings)

    def export_backbone(self) -> Backbone:
        return self.student.backbone
