"""Weighted k-NN (eval/knn.py) against hand-computed answers and a literal loop implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval.knn import class_scores, knn_classify, knn_predict, pair_settings, protocol_name


def loop_ranking(train_x, train_y, q, k, temperature):
    """The paper's formula, one test point at a time: sort all similarities, take k, sum exp(s/T).

    Returns the classes with a positive score, best first, and the scores as a dict.
    """
    sims = [(float(torch.dot(q, x)), int(y)) for x, y in zip(train_x, train_y, strict=True)]
    sims.sort(key=lambda t: -t[0])
    scores: dict[int, float] = {}
    for s, y in sims[:k]:
        scores[y] = scores.get(y, 0.0) + math.exp(s / temperature)
    return sorted(scores, key=lambda c: -scores[c]), scores


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_protocol_name():
    assert protocol_name(20, 0.07) == "knn-k20-t0.07"
    assert protocol_name(200, 0.1) == "knn-k200-t0.1"


def test_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:4] * 5  # 4 classes, orthogonal directions

    def sample(n):
        y = torch.arange(4).repeat_interleave(n)
        return F.normalize(centers[y] + 0.3 * torch.randn(len(y), 8, generator=g), dim=1), y

    train_x, train_y = sample(25)
    test_x, test_y = sample(10)
    assert knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07) == {
        "top1": 100.0,
        "top5": 100.0,
    }


def test_weighted_vote_beats_majority_by_hand():
    # q = (1, 0). One class-0 neighbour at similarity 1.0, two class-1 neighbours at 0.8.
    q = unit([1.0, 0.0])
    c = math.sqrt(1 - 0.8**2)
    train_x = unit([1.0, 0.0], [0.8, c], [0.8, -c], [-1.0, 0.0])
    train_y = torch.tensor([0, 1, 1, 2])
    # T = 0.07: exp(1/0.07) = 1.6e6 > 2 exp(0.8/0.07) = 1.8e5 -> class 0 (majority says 1).
    assert knn_predict(train_x, train_y, q, k=3, temperature=0.07)[0, 0] == 0
    assert (
        knn_classify(train_x, train_y, q, torch.tensor([0]), k=3, temperature=0.07)["top1"] == 100
    )
    # T = 1: e^1 = 2.72 < 2 e^0.8 = 4.45 -> class 1.
    assert knn_predict(train_x, train_y, q, k=3, temperature=1.0)[0, 0] == 1
    # The scores themselves, up to the per-row factor exp(-s_max / T) = exp(-1 / T).
    scores = class_scores(train_x, train_y, q, k=3, temperature=1.0, num_classes=3)
    expected = torch.tensor([[math.e, 2 * math.exp(0.8), 0.0]]) * math.exp(-1.0)
    torch.testing.assert_close(scores, expected)


def test_matches_loop_implementation_on_random_data():
    g = torch.Generator().manual_seed(1)
    n, m, d, c, k, t = 300, 60, 8, 10, 50, 0.1
    train_x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    train_y = torch.randint(0, c, (n,), generator=g)
    test_x = F.normalize(torch.randn(m, d, generator=g), dim=1)
    test_y = torch.randint(0, c, (m,), generator=g)
    ranked = knn_predict(train_x, train_y, test_x, k=k, temperature=t, num_classes=c, chunk_size=7)
    top1 = top5 = 0
    for i in range(m):
        order, _ = loop_ranking(train_x, train_y, test_x[i], k, t)
        assert len(order) >= 5  # every row ranks 5 classes unambiguously
        assert ranked[i].tolist() == order[:5]
        top1 += order[0] == test_y[i]
        top5 += int(test_y[i]) in order[:5]
    metrics = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=t, num_classes=c)
    assert metrics == {"top1": 100.0 * top1 / m, "top5": 100.0 * top5 / m}


def test_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(2)
    train_x = F.normalize(torch.randn(100, 16, generator=g), dim=1)
    train_y = torch.randint(0, 7, (100,), generator=g)
    test_x = F.normalize(torch.randn(33, 16, generator=g), dim=1)
    a = knn_predict(train_x, train_y, test_x, k=10, temperature=0.07, num_classes=7, chunk_size=4)
    b = knn_predict(
        train_x, train_y, test_x, k=10, temperature=0.07, num_classes=7, chunk_size=1000
    )
    assert torch.equal(a, b)


def test_top5_with_fewer_than_five_classes():
    train_x = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    train_y = torch.tensor([0, 1, 2])
    test_x = unit([0, 1, 0.1], [1, 0.2, 0])
    test_y = torch.tensor([2, 0])  # first one is wrong at top-1 but within top-3
    ranked = knn_predict(train_x, train_y, test_x, k=3, temperature=0.07)
    assert ranked.shape == (2, 3)
    assert ranked[:, 0].tolist() == [1, 0]
    metrics = knn_classify(train_x, train_y, test_x, test_y, k=3, temperature=0.07)
    assert metrics == {"top1": 50.0, "top5": 100.0}


def test_k_larger_than_train_set_is_clamped():
    train_x = unit([1, 0], [0.9, 0.1], [0, 1])
    train_y = torch.tensor([0, 0, 1])
    test_x = unit([0.1, 1], [1, 0.05])
    test_y = torch.tensor([1, 0])
    big = knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07)
    exact = knn_classify(train_x, train_y, test_x, test_y, k=3, temperature=0.07)
    assert big == exact == {"top1": 100.0, "top5": 100.0}
    # With all 3 neighbours voting, class 0's two points outvote class 1 at a flat temperature.
    assert knn_predict(train_x, train_y, test_x[:1], k=20, temperature=100.0)[0, 0] == 0


def test_small_temperature_does_not_overflow():
    train_x = unit([1, 0], [0.99, 0.14], [0, 1])
    train_y = torch.tensor([0, 1, 1])
    test_x = unit([1, 0.01])
    scores = class_scores(train_x, train_y, test_x, k=3, temperature=1e-3, num_classes=2)
    assert torch.isfinite(scores).all()
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=1e-3)[0, 0] == 0


@pytest.mark.parametrize("num_classes", [None, 12])
def test_num_classes_inferred_or_given(num_classes):
    train_x = unit([1, 0], [0, 1])
    train_y = torch.tensor([3, 5])
    ranked = knn_predict(train_x, train_y, unit([1, 0.1]), k=2, num_classes=num_classes)
    assert ranked.shape == (1, 5)
    assert ranked[0, :2].tolist() == [3, 5]


@pytest.mark.parametrize(
    ("ks", "temperatures", "expected"),
    [
        (None, None, [(20, 0.07), (200, 0.1)]),
        ([5], None, [(5, 0.07)]),
        (None, [0.2, 0.5], [(20, 0.2), (20, 0.5)]),
        ([10, 20], [0.1], [(10, 0.1), (20, 0.1)]),
        ([10, 20, 10], [0.1, 0.2, 0.1], [(10, 0.1), (20, 0.2)]),
    ],
)
def test_pair_settings(ks, temperatures, expected):
    assert pair_settings(ks, temperatures) == expected


def test_pair_settings_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same number of values"):
        pair_settings([1, 2, 3], [0.1, 0.2])
