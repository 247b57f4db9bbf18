"""SwAV: online codes by Sinkhorn-Knopp and the swapped prediction loss (Caron et al. 2020,
"Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", §3.1, Alg. 1).

Codes ``Q`` solve ``max_Q Tr(Qᵀ Cᵀ Z) + ε H(Q)`` over the transportation polytope
``{Q ∈ R₊^{K×B} : Q 1_B = 1/K 1_K, Qᵀ 1_K = 1/B 1_B}`` (equal partition of the batch among the
``K`` prototypes), solved by a few Sinkhorn-Knopp iterations on ``exp(Cᵀ Z / ε)``; columns are
then rescaled by ``B`` so each sample's code sums to 1. ``B`` is the *global* batch: the row sums
are all-reduced over ranks. The loss predicts the code of one crop from every other crop:
``ℓ(z_t, q_s) = −Σ_k q_s^(k) log softmax(z_tᵀ c / τ)^(k)``.
Defaults: ``ε = 0.05``, 3 iterations, ``τ = 0.1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.dino import upcast, world_size
from pretrain.losses.gather import all_reduce_sum_with_grad


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3
) -> torch.Tensor:
    """Codes ``[b, K]`` for this rank's ``scores [b, K]`` (prototype scores ``z·c``).

    The paper's ``distributed_sinkhorn``: ``Q = exp(scoresᵀ / ε)`` ``[K, B]``, normalised to sum
    1, then per iteration rows → ``1/K`` (sums all-reduced: a hidden sync) and columns → ``1/B``;
    finally ``× B``, so every row of the result sums to 1. No gradient.
    """
    q = torch.exp(upcast(scores).t() / epsilon)  # [K, b]
    k, batch = q.shape[0], q.shape[1] * world_size()  # B = global batch
    q /= all_reduce_sum_with_grad(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum_with_grad(q.sum(dim=1, keepdim=True))  # [K, 1]: rows over all ranks
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # [1, b]: a column lives on one rank
        q /= batch
    return (q * batch).t()  # [b, K]


def swav_loss(
    scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """Swapped prediction, averaged as the paper's code.

    ``scores``: one ``[b, K]`` per crop (globals first); ``codes``: one ``[b, K]`` per crop used
    for assignment (``codes[i]`` belongs to ``scores[i]``). For each code ``i``, the mean over
    the other crops ``v ≠ i`` of ``mean_b −Σ_k q_i log softmax(scores_v / τ)``; then the mean
    over codes.
    """
    total = scores[0].new_zeros((), dtype=upcast(scores[0]).dtype)
    for i, q in enumerate(codes):  # q: [b, K]
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            log_p = F.log_softmax(upcast(s) / temperature, dim=1)  # [b, K]
            sub = sub - torch.mean(torch.sum(q * log_p, dim=1))
        total = total + sub / (len(scores) - 1)
    return total / len(codes)
