"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", Sec. 3.4) as used by DINO (Caron et al. 2021, ``eval_knn.py``): for a test
feature ``q`` and L2-normalised train features ``x_i`` with labels ``y_i``,

    s_i       = <q, x_i>                                  (cosine similarity)
    N_k(q)    = indices of the k largest s_i
    score(c)  = sum_{i in N_k(q), y_i = c} exp(s_i / T)
    pred(q)   = argsort_c score(c), descending

Two settings are common: 20-NN with ``T = 0.07`` (Wu et al., DINO) and 200-NN with ``T = 0.1``
(Wu et al.'s and solo-learn's other setting); ``python -m eval knn`` runs both on one feature
extraction by default. Top-1 / top-5 accuracies are reported in percent.
"""

from __future__ import annotations

import torch

from eval.errors import EvalInputError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_SETTINGS: tuple[tuple[int, float], ...] = ((20, 0.07), (200, 0.1))  # (k, T) per protocol


def protocol_name(k: int, temperature: float) -> str:
    """The protocol tag of a results record, e.g. ``knn-k20-t0.07``."""
    return f"knn-k{k}-t{temperature:g}"


def pair_settings(
    ks: list[int] | None, temperatures: list[float] | None
) -> list[tuple[int, float]]:
    """``--k`` / ``--temperature`` lists -> ``[(k, T), ...]``, each setting once.

    Neither given: :data:`DEFAULT_SETTINGS` (both common protocols). One given: the other takes
    its single default (``--k 5`` -> ``[(5, 0.07)]``). Both: paired element-wise, a single value
    pairing with every value of the other list; other length mismatches are an
    :class:`EvalInputError` (a ValueError).
    """
    if ks is None and temperatures is None:
        return list(DEFAULT_SETTINGS)
    ks = ks or [DEFAULT_K]
    temperatures = temperatures or [DEFAULT_TEMPERATURE]
    if len(ks) == 1:
        ks = ks * len(temperatures)
    if len(temperatures) == 1:
        temperatures = temperatures * len(ks)
    if len(ks) != len(temperatures):
        raise EvalInputError(
            f"--k ({len(ks)} values) and --temperature ({len(temperatures)} values) must have "
            "the same number of values, or one of them a single value"
        )
    return list(dict.fromkeys(zip(ks, temperatures, strict=True)))


def class_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Weighted votes ``score[b, c] = sum_{i in top-k, y_i = c} exp((s_i - s_max) / T)``.

    ``train_feats [N, D]``, ``train_labels [N]``, ``test_feats [B, D]`` (all L2-normalised)
    -> ``[B, num_classes]``. Each row is scaled by ``exp(-s_max / T)`` (``s_max`` its largest
    similarity) so small temperatures cannot overflow; a per-row positive factor leaves the
    ranking of classes, hence every prediction, unchanged. ``k`` is clamped to ``N``.
    """
    k = min(k, train_feats.shape[0])
    sims = test_feats @ train_feats.T  # [B, N]
    top_sims, top_idx = sims.topk(k, dim=1)  # [B, k], sorted descending
    weights = ((top_sims - top_sims[:, :1]) / temperature).exp()  # [B, k]
    neighbour_labels = train_labels[top_idx]  # [B, k]
    scores = torch.zeros(
        test_feats.shape[0], num_classes, dtype=weights.dtype, device=weights.device
    )
    return scores.scatter_add_(1, neighbour_labels, weights)  # [B, C]


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Ranked class predictions ``[M, min(5, C)]`` (column 0 is the top-1 prediction).

    Test rows are processed ``chunk_size`` at a time, so memory is ``O(chunk_size * N)``.
    ``num_classes`` defaults to ``max(train_labels) + 1``.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one train feature")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    train_labels = train_labels.to(train_feats.device)
    ranked = []
    for start in range(0, test_feats.shape[0], chunk_size):
        chunk = test_feats[start : start + chunk_size].to(train_feats.device)  # [b, D]
        scores = class_scores(train_feats, train_labels, chunk, k, temperature, num_classes)
        ranked.append(scores.topk(min(5, num_classes), dim=1).indices.cpu())  # [b, <=5]
    return torch.cat(ranked) if ranked else torch.zeros(0, min(5, num_classes), dtype=torch.long)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of the weighted k-NN vote (see the module docstring).

    ``train_feats [N, D]``, ``train_labels [N]``, ``test_feats [M, D]``, ``test_labels [M]``;
    features L2-normalised. With fewer than 5 classes "top5" is top-``C`` (always 100).
    ``num_classes`` defaults to ``max(train_labels, test_labels) + 1``.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ranked = knn_predict(
        train_feats, train_labels, test_feats, k, temperature, num_classes, chunk_size
    )  # [M, <=5]
    hits = ranked == test_labels.cpu().view(-1, 1)  # [M, <=5]
    total = max(test_labels.shape[0], 1)
    return {
        "top1": 100.0 * hits[:, 0].sum().item() / total,
        "top5": 100.0 * hits.any(dim=1).sum().item() / total,
    }
