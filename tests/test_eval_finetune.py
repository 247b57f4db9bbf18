"""Fine-tuning and semi-supervised eval on a real CIFAR-10 subset (CPU, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import eval.__main__ as cli
from eval.finetune import Classifier, FinetuneConfig, finetune, optimizer_groups, with_drop_path
from eval.finetune_data import dataset_labels
from eval.semisup import load_or_make_subset, make_subset
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.export import export_backbone

TINY_VIT = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                          kwargs={"depth": 1})  # fmt: skip
FAST = ("--max-train", "64", "--max-test", "32", "--batch-size", "16", "--num-workers", "0",
        "--device", "cpu", "--epochs", "1", "--warmup-epochs", "0.5")  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(1)
    resnet = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
    vit = build_backbone(TINY_VIT)
    return {"resnet": export_backbone(resnet, root / "r18" / "export"),
            "vit": export_backbone(vit, root / "vit" / "export")}  # fmt: skip


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finetune_changes_weights_with_mixup(cifar_train_shards):
    torch.manual_seed(0)
    backbone = build_backbone(TINY_VIT)
    before = {k: v.clone() for k, v in backbone.net.state_dict().items()}
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=1e-3, mixup=0.8, cutmix=1.0,
                         drop_path=0.1, max_steps=3, num_workers=0)  # fmt: skip
    model, summary = finetune(backbone, cifar_train_shards, range(64), 10, cfg, 32,
                              [0.5] * 3, [0.25] * 3)  # fmt: skip
    assert summary["steps"] == 3 and all(
        torch.isfinite(torch.tensor(summary[k])) for k in ("first_loss", "last_loss")
    )
    after = model.backbone.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in backbone.net.state_dict().items())  # a copy
    assert model.backbone.cfg.drop_path_rate == 0.1  # rebuilt with stochastic depth


def test_layer_decay_applies_to_vit():
    backbone = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", img_size=32,
                                             patch_size=8, kwargs={"depth": 3}))  # fmt: skip
    deep = with_drop_path(backbone, 0.2)  # timm: rates linear over depth, 0 .. 0.2
    assert deep.net.blocks[2].drop_path1.drop_prob == pytest.approx(0.2)
    for a, b in zip(backbone.net.parameters(), deep.net.parameters(), strict=True):
        assert torch.equal(a, b)  # same weights
    model = Classifier(backbone, 10)
    groups = optimizer_groups(model, 0.05, 0.5)
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert sorted(scale) == [0, 1, 2, 3, 4]
    assert [scale[i] for i in range(5)] == [0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    embed = next(g for g in groups if any(p is backbone.net.patch_embed.proj.weight
                                          for p in g["params"]))  # fmt: skip
    assert embed["lr_scale"] == 0.5**4


def test_cli_finetune_result_line(exports, cifar_train_shards, tmp_path):
    results = tmp_path / "results.jsonl"
    argv = ["finetune", "--backbone", str(exports["resnet"]), "--train", str(cifar_train_shards),
            "--test", str(cifar_train_shards), "--results", str(results), *FAST,
            "--max-steps", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    (record,) = read_lines(results)
    assert record["protocol"] == "finetune" and set(record["metrics"]) == {"top1", "top5"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    config = record["config"]
    assert config["steps"] == 2 and config["mixup"] == 0.8 and config["cutmix"] == 1.0
    assert config["num_train"] == 64 and config["num_test"] == 32 and config["num_classes"] == 10
    assert config["peak_lr"] == pytest.approx(5e-4 * 16 / 256)


def test_subset_deterministic_and_balanced():
    labels = torch.arange(10).repeat_interleave(50)  # 10 classes x 50
    a = make_subset(labels, 0.1, "class", seed=3)
    assert a == make_subset(labels, 0.1, "class", seed=3)
    assert a != make_subset(labels, 0.1, "class", seed=4)
    assert len(a) == 50 and torch.bincount(labels[a], minlength=10).tolist() == [5] * 10
    u = make_subset(labels, 0.01, "uniform", seed=0)
    assert len(u) == 5 and len(set(u)) == 5 and u == sorted(u)


def test_subset_file_reused_and_checked(cifar_train_shards, tmp_path):
    path = tmp_path / "subset.json"
    first, info = load_or_make_subset(path, str(cifar_train_shards), 320, 0.1, "class", seed=0)
    labels = dataset_labels(cifar_train_shards)
    assert len(first) == 30  # 32 per class -> round(3.2) = 3 each
    assert torch.bincount(labels[first], minlength=10).tolist() == [3] * 10
    assert info["subset_reused"] is False and path.is_file()
    again, info2 = load_or_make_subset(path, str(cifar_train_shards), 320, 0.1, "class", seed=9)
    assert again == first and info2["subset_reused"] and info2["subset_seed"] == 0
    assert info2["subset_sha256"] == info["subset_sha256"]
    with pytest.raises(cli.EvalInputError, match="fraction"):
        load_or_make_subset(path, str(cifar_train_shards), 320, 0.01, "class", seed=0)


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_cli_semisup_modes(mode, exports, cifar_train_shards, tmp_path):
    results = tmp_path / "results.jsonl"
    argv = ["semisup", "--backbone", str(exports["vit"]), "--train", str(cifar_train_shards),
            "--test", str(cifar_train_shards), "--results", str(results), "--fraction", "0.1",
            "--mode", mode, "--cache-dir", str(tmp_path / "cache"), "--lrs", "0.01", "0.1",
            "--max-steps", "2", *FAST[2:]]  # fmt: skip
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--seed", "5"]) == 0  # the seed is part of the default file name
    first, second = read_lines(results)
    for record in (first, second):
        assert record["protocol"] == f"semisup-10pct-{mode}"
        assert {"top1", "top5"} <= set(record["metrics"])
        assert record["config"]["mode"] == mode and record["config"]["fraction"] == 0.1
        assert record["config"]["subset_size"] == 30 and record["config"]["num_train"] == 30
        assert len(record["config"]["subset_sha256"]) == 64
    assert first["config"]["subset_reused"] is False
    files = sorted(tmp_path.glob("semisup-*.json"))
    assert len(files) == 2  # seed is part of the default name: two subsets
    # an explicit file is reused across seeds
    argv_file = [*argv, "--subset-file", str(files[0]), "--seed", "7"]
    assert cli.main(argv_file) == 0
    third = read_lines(results)[2]
    assert third["config"]["subset_reused"] and third["config"]["subset_file"] == str(files[0])


@pytest.mark.parametrize("command", ["finetune", "semisup"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    options = [
        "--backbone",
        "--train",
        "--test",
        "--epochs",
        "--blr",
        "--layer-decay",
        "--mixup",
        "--cutmix",
        "--smoothing",
        "--drop-path",
        "--warmup-epochs",
        "--seed",
    ]
    if command == "semisup":
        options += ["--fraction", "--balance", "--mode", "--subset-file", "--subset-dir"]
    for option in options:
        assert option in out


def test_image_folder_stream_covers_the_subset_once_per_epoch(cifar_train_shards):
    """Class-folder input (the tree the shards were written from): every kept index once per
    epoch with its ImageFolder label, a new order each epoch."""
    from eval.finetune_data import LabelledTrainStream, train_transform

    folder = cifar_train_shards.parent / "images"
    labels = dataset_labels(folder)
    keep = list(range(0, 320, 7))
    stream = LabelledTrainStream(folder, keep, train_transform(32, [0.5] * 3, [0.25] * 3), seed=3)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        items = list(stream)
        assert sorted(i for _, _, i in items) == keep
        assert all(label == int(labels[i]) for _, label, i in items)
        assert all(img.shape == (3, 32, 32) for img, _, _ in items)
        orders.append([i for _, _, i in items])
    assert orders[0] != orders[1]


def test_cli_finetune_on_an_image_folder(exports, cifar_train_shards, tmp_path):
    folder = str(cifar_train_shards.parent / "images")
    results = tmp_path / "results.jsonl"
    argv = ["finetune", "--backbone", str(exports["resnet"]), "--train", folder, "--test", folder,
            "--results", str(results), *FAST, "--max-steps", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    (record,) = read_lines(results)
    assert record["config"]["num_train"] == 64 and record["dataset"].endswith("/images")
