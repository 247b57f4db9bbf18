"""Detection transfer (``python -m eval detect``) on the real raccoon set (CPU, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import eval.__main__ as cli
from eval.detection.data import CocoDetection
from eval.detection.models import SimpleFeaturePyramid, dynamic_vit, resnet_fpn
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.export import export_backbone
from tests.paths import RACCOON

TINY_VIT = BackboneConfig(name="vit_tiny_patch16_224", kwargs={"depth": 1})
FAST = ("--iters", "3", "--warmup-iters", "1", "--batch-size", "2", "--min-size", "160",
        "--max-size", "224", "--max-train", "16", "--max-val", "4", "--num-workers", "0",
        "--device", "cpu")  # fmt: skip

pytestmark = pytest.mark.skipif(not RACCOON.is_dir(), reason=f"raccoon set not at {RACCOON}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detect")
    torch.manual_seed(1)
    return {"resnet": export_backbone(build_backbone(BackboneConfig(name="resnet18")), root / "r18"),
            "vit": export_backbone(build_backbone(TINY_VIT), root / "vit")}  # fmt: skip


def test_reader_converts_coco_boxes_to_xyxy():
    coco = json.loads((RACCOON / "instances_val.json").read_text())
    data = CocoDetection(RACCOON / "instances_val.json")
    index = next(i for i, im in enumerate(data.images)
                 if sum(a["image_id"] == im["id"] for a in coco["annotations"]) >= 1)  # fmt: skip
    info = data.images[index]
    anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
    image, target = data[index]
    assert (
        image.shape == (3, info["height"], info["width"]) and 0 <= image.min() <= image.max() <= 1
    )
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert torch.allclose(target["boxes"], torch.tensor(expected, dtype=torch.float32))
    assert target["labels"].tolist() == [1] * len(anns) and int(target["image_id"]) == info["id"]
    assert data.num_classes == 2 and data.category_ids == [1]


def test_train_flip_mirrors_boxes():
    data = CocoDetection(RACCOON / "instances_train.json", train=True, max_images=1)
    plain = data.target(0)["boxes"]
    width = data.images[0]["width"]
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        _, target = data[0]
        flipped = not torch.equal(target["boxes"], plain)
        seen.add(flipped)
        if flipped:
            assert torch.allclose(target["boxes"][:, [2, 0]], width - plain[:, [0, 2]])
    assert seen == {True, False}


def test_simple_feature_pyramid_strides():
    torch.manual_seed(0)
    pyramid = SimpleFeaturePyramid(dynamic_vit(build_backbone(TINY_VIT)))
    out = pyramid(torch.randn(2, 3, 128, 192))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for level, stride in zip(("0", "1", "2", "3", "pool"), (4, 8, 16, 32, 64), strict=True):
        assert out[level].shape == (2, 256, 128 // stride, 192 // stride)


def test_resnet_fpn_levels_and_freezing():
    backbone = build_backbone(BackboneConfig(name="resnet18"))
    frozen = resnet_fpn(backbone, trainable_layers=0)
    assert not any(p.requires_grad for p in frozen.body.parameters())
    assert all(p.requires_grad for p in frozen.fpn.parameters())
    partial = resnet_fpn(backbone, trainable_layers=2)
    trained = {n.split(".")[0] for n, p in partial.body.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4"}
    out = frozen(torch.randn(1, 3, 128, 128))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4),
                                                            (2, 2)]  # fmt: skip


def _detect(backbone: Path, results: Path, *extra: str) -> list[dict]:
    argv = ["detect", "--backbone", str(backbone),
            "--train", str(RACCOON / "instances_train.json"),
            "--test", str(RACCOON / "instances_val.json"), "--results", str(results),
            *FAST, *extra]  # fmt: skip
    assert cli.main(argv) == 0
    return [json.loads(line) for line in results.read_text().splitlines()]


def _check(record: dict, frozen: bool) -> None:
    assert record["protocol"] == "detect" and record["dataset"].endswith("instances_val.json")
    assert set(record["metrics"]) == {"AP", "AP50", "AP75"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    config = record["config"]
    assert math.isfinite(config["first_loss"]) and math.isfinite(config["last_loss"])
    assert config["iters"] == 3 and config["min_size"] == 160 and config["max_size"] == 224
    assert config["frozen"] is frozen and config["num_test"] == 4 and config["num_train"] == 16


def test_cli_detect_resnet_with_random_baseline(exports, tmp_path):
    records = _detect(exports["resnet"], tmp_path / "r.jsonl", "--random-init-baseline")
    assert [r["config"]["init"] for r in records] == ["trained", "random"]
    for record in records:
        _check(record, frozen=False)
        assert record["config"]["family"] == "resnet" and record["config"]["trainable_layers"] == 5


def test_cli_detect_vit_frozen(exports, tmp_path):
    (record,) = _detect(exports["vit"], tmp_path / "v.jsonl", "--freeze-backbone",
                        "--optimizer", "adamw")  # fmt: skip
    _check(record, frozen=True)
    assert record["config"]["family"] == "vit" and record["config"]["optimizer"] == "adamw"
