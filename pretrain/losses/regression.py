"""Regression losses between a prediction and a stop-gradient target (BYOL, SimSiam).

Both are per-sample losses averaged over the local batch: under DDP the gradient average over
ranks then gives the global-batch mean, so no collective is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2) for one view order::

        L = || p/||p|| − z'/||z'|| ||²  =  2 − 2 · <p, z'> / (||p|| · ||z'||)

    averaged over the batch. The target ``z'`` (EMA network's projection) gets no gradient.
    BYOL's total loss is the symmetric sum ``L(p1, z2') + L(p2, z1')``.

    Args:
        p: ``[b, D]`` online predictions (with gradient).
        z: ``[b, D]`` target projections (detached here).
    """
    cos = F.cosine_similarity(p, z.detach(), dim=-1)  # [b]
    return (2 - 2 * cos).mean()


def negative_cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, stopgrad(z))`` (Chen & He 2021, eq. 1 and 3)::

        D(p, z) = − <p, z> / (||p|| · ||z||)

    averaged over the batch, with the stop-gradient on ``z`` applied here. SimSiam's total loss
    is ``D(p1, z2) / 2 + D(p2, z1) / 2`` (minimum −1).

    Args:
        p: ``[b, D]`` predictor outputs of one view (with gradient).
        z: ``[b, D]`` projector outputs of the other view (detached here).
    """
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()  # [b] → scalar
