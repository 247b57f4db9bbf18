"""Linear probe: accuracy on separable features, the one-pass lr grid, selection, cache, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval.__main__ as cli
from eval.linear import (
    FeatureCache,
    ProbeConfig,
    cache_key,
    linear_probe,
    split_train_val,
    train_probes,
)
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.export import export_backbone

REPO = Path(__file__).resolve().parents[1]


def blobs(n: int, dim: int = 32, classes: int = 5, seed: int = 0, spread: float = 0.5):
    """Gaussian blobs around well-separated random centres (linearly separable w.h.p.)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3.0
    labels = torch.randint(0, classes, (n,), generator=gen)
    feats = centres[labels] + spread * torch.randn(n, dim, generator=gen) + 5.0  # offset: BN
    return feats, labels


def test_probe_separates_blobs():
    train_x, train_y = blobs(2000, seed=0)
    test_x, test_y = blobs(1000, seed=1)
    cfg = ProbeConfig(lrs=(0.01, 0.1), epochs=10, warmup_epochs=1, batch_size=128)
    result = linear_probe(train_x, train_y, test_x, test_y, cfg, val_fraction=0.1)
    assert result.top1 >= 95.0 and result.top5 == 100.0 and result.val_top1 >= 95.0
    assert [row["lr"] for row in result.grid] == [0.01, 0.1]


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_grid_in_one_pass_equals_separate_runs(optimizer):
    feats, labels = blobs(300, dim=16, classes=4, spread=2.0)
    lrs = (0.003, 0.1, 1.0)
    common = {"epochs": 3, "warmup_epochs": 1, "batch_size": 64, "optimizer": optimizer}
    common |= {"weight_decay": 1e-3, "seed": 7}  # weight decay on: the groups must keep it
    grid = train_probes(feats, labels, 4, ProbeConfig(lrs=lrs, **common))
    for g, lr in enumerate(lrs):
        alone = train_probes(feats, labels, 4, ProbeConfig(lrs=(lr,), **common))
        torch.testing.assert_close(grid.heads[g].weight, alone.heads[0].weight)
        torch.testing.assert_close(grid.heads[g].bias, alone.heads[0].bias)
        torch.testing.assert_close(grid.bn.running_mean, alone.bn.running_mean)
    # the learning rates made a difference, so the comparison above is not vacuous
    assert not torch.allclose(grid.heads[0].weight, grid.heads[2].weight)


def test_lr_is_chosen_on_validation_not_test():
    """Test labels are shifted by one class: the head best on validation is worst on test."""
    train_x, train_y = blobs(1000, seed=0)
    test_x, test_y = blobs(500, seed=1)
    shifted = (test_y + 1) % 5
    cfg = ProbeConfig(lrs=(1e-6, 0.1), epochs=5, warmup_epochs=0, batch_size=128)
    result = linear_probe(train_x, train_y, test_x, shifted, cfg, val_fraction=0.2)
    vals = [row["val_top1"] for row in result.grid]
    assert result.lr == 0.1 and result.val_top1 == max(vals) and vals[1] > vals[0]
    assert result.top1 < 5.0  # the chosen head, reported on test even though it does badly there
    honest = linear_probe(train_x, train_y, test_x, test_y, cfg, val_fraction=0.2)
    assert honest.lr == 0.1 and honest.val_top1 == result.val_top1 and honest.top1 > 95.0


def test_val_split_is_seeded_and_disjoint():
    fit, val = split_train_val(100, 0.1, seed=3)
    assert len(val) == 10 and len(fit) == 90
    assert set(fit.tolist()) | set(val.tolist()) == set(range(100))
    assert torch.equal(val, split_train_val(100, 0.1, seed=3)[1])
    assert not torch.equal(val, split_train_val(100, 0.1, seed=4)[1])


def test_feature_cache_hit_and_miss(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    key = cache_key("a" * 64, data, "train", 32, [0.5] * 3, [0.2] * 3, None)
    feats, labels, index = torch.randn(6, 4), torch.arange(6), torch.arange(6)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.get(key, lambda: (feats, labels, index))
    assert cache.misses == 1 and cache.path(key).is_file()
    assert not list((tmp_path / "cache").glob(".*tmp"))  # atomic write left no temp file

    def boom():
        raise AssertionError("backbone must not run on a cache hit")

    second = FeatureCache(tmp_path / "cache").get(key, boom)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    variants = [
        cache_key("b" * 64, data, "train", 32, [0.5] * 3, [0.2] * 3, None),  # other weights
        cache_key("a" * 64, other, "train", 32, [0.5] * 3, [0.2] * 3, None),  # other data
        cache_key("a" * 64, data, "test", 32, [0.5] * 3, [0.2] * 3, None),  # other split
        cache_key("a" * 64, data, "train", 64, [0.5] * 3, [0.2] * 3, None),  # other size
        cache_key("a" * 64, data, "train", 32, [0.4] * 3, [0.2] * 3, None),  # other mean
        cache_key("a" * 64, data, "train", 32, [0.5] * 3, [0.2] * 3, 10),  # other limit
        cache_key("a" * 64, data, "train", 32, [0.5] * 3, [0.2] * 3, None, "random"),
    ]
    assert len({key, *variants}) == len(variants) + 1
    miss = FeatureCache(tmp_path / "cache")
    miss.get(variants[0], lambda: (feats, labels, index))
    assert miss.misses == 1 and miss.hits == 0


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    backbone = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
    return export_backbone(backbone, tmp_path_factory.mktemp("linear") / "run" / "export")


def linear_args(export: Path, shards: Path, results: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "linear",
        *("--backbone", str(export), "--train", str(shards), "--test", str(shards)),
        *("--max-train", "120", "--max-test", "40", "--results", str(results)),
        *("--num-workers", "0", "--batch-size", "64", "--device", "cpu"),
        *("--lrs", "0.01", "0.1", "--epochs", "3", "--warmup-epochs", "1"),
        *("--probe-batch-size", "32", "--cache-dir", str(cache)),
        *extra,
    ]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_linear_end_to_end(export, cifar_train_shards, tmp_path):
    results = tmp_path / "results.jsonl"
    argv = linear_args(export, cifar_train_shards, results, tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "eval", *argv], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (record,) = read_lines(results)
    assert set(record) == {"checkpoint", "sha256", "protocol", "dataset", "metrics", "config",
                           "seconds", "versions"}  # fmt: skip
    assert record["protocol"] == "linear" and record["checkpoint"] == str(export.resolve())
    assert set(record["metrics"]) == {"top1", "top5", "val_top1"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    config = record["config"]
    assert config["lrs"] == [0.01, 0.1] and config["lr"] in (0.01, 0.1)
    assert [row["lr"] for row in config["grid"]] == [0.01, 0.1]
    best = max(config["grid"], key=lambda row: row["val_top1"])
    assert record["metrics"]["val_top1"] == best["val_top1"]
    assert config["epochs"] == 3 and config["probe_batch_size"] == 32
    assert config["optimizer"] == "sgd" and config["seed"] == 0 and config["val_fraction"] == 0.1
    assert config["feature_cache"]["hit"] is False
    assert config["num_train"] == 120 and config["num_test"] == 40 and config["init"] == "trained"
    assert "| linear" in proc.stdout
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_cli_second_run_hits_cache(export, cifar_train_shards, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    argv = linear_args(export, cifar_train_shards, results, tmp_path / "cache")
    assert cli.main(argv) == 0

    def boom(*args, **kwargs):
        raise AssertionError("the backbone ran although the features are cached")

    import eval.features

    monkeypatch.setattr(eval.features, "extract_raw_features", boom)
    assert cli.main(argv) == 0
    first, second = read_lines(results)
    assert first["metrics"] == second["metrics"]
    assert first["config"]["grid"] == second["config"]["grid"]
    assert first["config"]["feature_cache"]["hit"] is False
    assert second["config"]["feature_cache"]["hit"] is True
    with pytest.raises(AssertionError, match="backbone ran"):  # other data: a miss
        cli.main([*argv, "--max-test", "30"])


def test_linear_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["linear", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backbone", "--train", "--test", "--lrs", "--epochs", "--warmup-epochs",
                   "--probe-batch-size", "--optimizer", "--weight-decay", "--val-fraction",
                   "--seed", "--cache-dir", "--no-cache", "--results"):  # fmt: skip
        assert option in out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["linear", "--backbone", "x", "--train", "a", "--test",
                                       "b", "--val-fraction", "1"])  # fmt: skip
