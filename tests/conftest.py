"""Shared fixtures: a small real CIFAR-10 subset written as shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_prep.writer import WriteOptions, write_shards

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


def cifar_subset(dest: Path, split: str, per_class: int) -> Path:
    """A class-folder tree of symlinks to the first ``per_class`` images of each class."""
    if not (CIFAR10 / split).is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10}")
    for class_dir in sorted((CIFAR10 / split).iterdir()):
        out = dest / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for img in sorted(class_dir.iterdir())[:per_class]:
            (out / img.name).symlink_to(img)
    return dest


@pytest.fixture(scope="session")
def cifar_train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 real CIFAR-10 training images (32 per class) in 8 shards of 40."""
    root = tmp_path_factory.mktemp("cifar_train")
    src = cifar_subset(root / "images", "train", 32)
    write_shards(src, root / "shards", WriteOptions(shard_size=40, workers=1))
    return root / "shards"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA; without it they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
