"""Collapse monitor: is the representation spreading out or shrinking to a point / a subspace?

Two numbers per log step, on the embeddings ``z [b, D]`` a method reports:

* ``emb_std``: mean over dimensions of the std of the L2-normalised rows. A collapsed
  representation gives 0; uniformly spread unit vectors give about ``1 / sqrt(D)``
  (SimSiam, Chen & He 2021, §4.1).
* ``emb_rank``: effective rank (Roy & Vetterli 2007), ``exp(H(p))`` with ``p_i = σ_i / Σ σ`` the
  normalised singular values of the centred embeddings: between 1 (one direction) and
  ``min(b, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_metrics(z: torch.Tensor) -> dict[str, float]:
    """``{"emb_std", "emb_rank"}`` of embeddings ``z [b, D]`` (computed in float32)."""
    z = F.normalize(z.float(), dim=1)  # [b, D]
    std = z.std(dim=0).mean()
    sigma = torch.linalg.svdvals(z - z.mean(dim=0))  # [min(b, D)]
    p = sigma / sigma.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"emb_std": float(std), "emb_rank": float(torch.exp(entropy))}
