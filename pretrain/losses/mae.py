"""MAE's reconstruction loss (He et al. 2022, §3 "Reconstruction target")."""

from __future__ import annotations

import torch


def mae_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error on the masked patches only::

        loss = Σ_{i, j} mask_ij · mean_c (pred_ijc − t_ijc)²  /  Σ_{i, j} mask_ij

    With ``norm_pix`` (the paper's default for its best results) each target patch is normalised
    by its own pixels: ``t = (t − mean) / sqrt(var + 1e-6)``, ``var`` unbiased as in the official
    code (``Tensor.var``).

    Args:
        pred: ``[B, N, p·p·C]`` decoder outputs for every patch.
        target: ``[B, N, p·p·C]`` patchified input image.
        mask: ``[B, N]`` 1 for masked (reconstructed) patches, 0 for visible ones.

    Every sample masks the same number of patches, so the mean of the per-rank losses is the
    loss of one process holding the global batch.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [B, N, 1]
        var = target.var(dim=-1, keepdim=True)  # [B, N, 1]
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, N]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
