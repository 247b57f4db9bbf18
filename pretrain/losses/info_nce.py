"""Contrastive (InfoNCE) losses over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.gather import gather_no_grad, gather_with_grad, rank_offset


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) over the global batch of 2N views.

    For anchor ``i`` with positive ``j(i)`` (the other view of the same image), with cosine
    similarities ``s``::

        l(i) = -log( exp(s_i,j(i) / T) / sum_{k != i} exp(s_i,k / T) )

    averaged over the 2N anchors; the candidates ``k`` are all 2N views of the *global* batch,
    gathered with gradient so the loss and its gradient match one process holding the whole batch.

    Args:
        z1, z2: ``[b, D]`` projections of the two views on this rank (unnormalised).
        temperature: ``T`` (0.1 to 0.5 in the paper; 0.5 for CIFAR, 0.1 for ImageNet at large batch).

    Returns: scalar, the mean over this rank's 2b anchors (DDP's gradient average then gives the
    global mean).
    """
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # [b, D]
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)  # [B, D]
    big_b = g1.shape[0]
    candidates = torch.cat([g1, g2], dim=0)  # [2B, D]
    anchors = torch.cat([z1, z2], dim=0)  # [2b, D]
    logits = anchors @ candidates.T / temperature  # [2b, 2B]
    own = torch.arange(b, device=z1.device) + rank_offset(b)  # global index of each local image
    self_idx = torch.cat([own, own + big_b])  # [2b] the anchor itself
    positive = torch.cat([own + big_b, own])  # [2b] the other view
    logits = logits.masked_fill(
        F.one_hot(self_idx, 2 * big_b).bool(), torch.finfo(logits.dtype).min
    )
    return F.cross_entropy(logits, positive)


def moco_infonce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's InfoNCE (Chen, Xie, He 2021, Alg. 1): queries against the global batch of keys.

    ``loss = CE(q · K^T / T, labels = own index) * 2T``, where ``K`` are the momentum encoder's
    keys gathered from all ranks (no gradient). The ``2T`` factor is the paper's code's scaling.

    Args:
        q: ``[b, D]`` predictor outputs of one view (with gradient).
        k: ``[b, D]`` momentum-encoder outputs of the other view (no gradient).
        temperature: ``T`` (0.2 for ViT and ResNet in the paper; 1.0 for the ResNet-50 recipe).
    """
    b = q.shape[0]
    q = F.normalize(q, dim=1)  # [b, D]
    keys = gather_no_grad(F.normalize(k, dim=1))  # [B, D]
    logits = q @ keys.T / temperature  # [b, B]
    labels = torch.arange(b, device=q.device) + rank_offset(b)
    return F.cross_entropy(logits, labels) * (2 * temperature)
