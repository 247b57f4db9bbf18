"""Losses against literal, loop-based formulations of the papers' equations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.losses.info_nce import moco_infonce_loss, nt_xent_loss


def literal_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. (1) with explicit loops over the 2N views (k ranges over all k != i)."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def literal_moco(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """MoCo v3 Alg. 1: CE(q·k^T/T, own index) * 2T, as loops over the batch."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[j]) / t for j in range(k.shape[0])]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / q.shape[0] * 2 * t


def test_nt_xent_matches_literal_equation() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.5):
        got = float(nt_xent_loss(z1.double(), z2.double(), t))
        assert abs(got - literal_nt_xent(z1.double(), z2.double(), t)) < 1e-9


def test_nt_xent_is_low_for_matching_views() -> None:
    z = torch.randn(8, 16)
    aligned = float(nt_xent_loss(z, z, 0.1))
    random = float(nt_xent_loss(z, torch.randn(8, 16), 0.1))
    assert aligned < random


def test_moco_infonce_matches_literal_equation() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(7, 4, generator=g).double(), torch.randn(7, 4, generator=g).double()
    assert abs(float(moco_infonce_loss(q, k, 0.2)) - literal_moco(q, k, 0.2)) < 1e-9


def test_collapse_metrics_tell_collapsed_from_spread() -> None:
    from pretrain.collapse import collapse_metrics

    g = torch.Generator().manual_seed(0)
    spread = collapse_metrics(torch.randn(256, 16, generator=g))
    collapsed = collapse_metrics(torch.ones(256, 16) + 1e-6 * torch.randn(256, 16, generator=g))
    line = collapse_metrics(torch.randn(256, 1, generator=g) * torch.ones(1, 16))
    assert abs(spread["emb_std"] - 16**-0.5) < 0.02 and spread["emb_rank"] > 12
    assert collapsed["emb_std"] < 1e-4
    assert line["emb_rank"] < 1.5  # one direction only
