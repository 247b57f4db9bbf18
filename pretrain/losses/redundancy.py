"""Redundancy-reduction losses over the global batch (Barlow Twins, VICReg).

Both losses need statistics of each embedding dimension over the *global* batch. Every rank
computes the same global loss; the collectives sum the gradient over ranks in backward, so after
DDP's gradient average the update equals one process holding the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pretrain.losses.gather import all_reduce_sum_with_grad, gather_with_grad


class BarlowTwinsTerms(NamedTuple):
    loss: torch.Tensor  # on_diag + λ · off_diag
    on_diag: torch.Tensor  # Σ_i (1 − C_ii)²
    off_diag: torch.Tensor  # Σ_{i≠j} C_ij²


class VICRegTerms(NamedTuple):
    loss: torch.Tensor  # λ · invariance + μ · variance + ν · covariance
    invariance: torch.Tensor  # MSE(Z, Z')
    variance: torch.Tensor  # (v(Z) + v(Z')) / 2
    covariance: torch.Tensor  # c(Z) + c(Z')


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The ``n·(n−1)`` off-diagonal entries of a square ``[n, n]`` matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def global_standardize(z: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise each dimension over the global batch, as a BatchNorm without affine in
    training mode (biased variance): ``(z − mean) / sqrt(var + eps)``.

    Returns the local rows ``[b, D]`` standardised and the global batch size ``N`` (a tensor).
    """
    n = all_reduce_sum_with_grad(z.new_tensor(float(z.shape[0])))  # N = Σ_r b_r
    mean = all_reduce_sum_with_grad(z.sum(0)) / n  # [D]
    var = all_reduce_sum_with_grad((z - mean).pow(2).sum(0)) / n  # [D]
    return (z - mean) / torch.sqrt(var + eps), n


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5
) -> BarlowTwinsTerms:
    """Barlow Twins (Zbontar et al. 2021, eq. 1 and 2)::

        C_ij = Σ_b z1_bi · z2_bj / N        (z standardised per dimension over the batch)
        L    = Σ_i (1 − C_ii)²  +  λ · Σ_i Σ_{j≠i} C_ij²

    ``N`` is the global batch: means, variances and ``C`` are summed over ranks (with gradient),
    so 2 ranks × N/2 give exactly the loss and gradient of 1 rank × N (the official code's
    ``all_reduce(c)`` carries no gradient). Defaults: ``λ = 0.0051`` (paper: 5e-3), BN eps 1e-5.

    Args:
        z1, z2: ``[b, D]`` projector outputs of the two views on this rank.
    """
    z1n, _ = global_standardize(z1, eps)  # [b, D]
    z2n, n = global_standardize(z2, eps)  # [b, D]
    c = all_reduce_sum_with_grad(z1n.T @ z2n) / n  # [D, D]
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return BarlowTwinsTerms(on_diag + lambd * off_diag, on_diag, off_diag)


def variance_loss(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's ``v(Z) = 1/D Σ_j max(0, 1 − sqrt(Var(z_j) + ε))`` (unbiased variance, γ = 1)
    over the rows of ``z [N, D]``."""
    std = torch.sqrt(z.var(dim=0) + eps)  # [D]
    return F.relu(1 - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg's ``c(Z) = 1/D Σ_{i≠j} Cov(Z)_ij²`` with ``Cov = (Z − Z̄)^T (Z − Z̄) / (N − 1)``
    over the rows of ``z [N, D]``."""
    n, d = z.shape
    zc = z - z.mean(dim=0)  # [N, D]
    cov = zc.T @ zc / (n - 1)  # [D, D]
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> VICRegTerms:
    """VICReg (Bardes, Ponce, LeCun 2022, eq. 1 to 6)::

        s(Z, Z') = 1/(N·D) Σ_b ||z_b − z'_b||²
        L = λ · s(Z, Z') + μ · (v(Z) + v(Z')) / 2 + ν · (c(Z) + c(Z'))

    with :func:`variance_loss` and :func:`covariance_loss` over the global batch (embeddings
    gathered from every rank with gradient). The variance term is averaged over the two branches
    and the covariance term summed, as in the authors' released code (their Alg. 1 sums both);
    ``λ = μ = 25``, ``ν = 1``, ``ε = 1e-4`` are the paper's defaults.

    Args:
        z1, z2: ``[b, D]`` expander (projector) outputs of the two views on this rank.
    """
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)  # [N, D]
    inv = F.mse_loss(g1, g2)
    var = (variance_loss(g1, eps) + variance_loss(g2, eps)) / 2
    cov = covariance_loss(g1) + covariance_loss(g2)
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return VICRegTerms(loss, inv, var, cov)
