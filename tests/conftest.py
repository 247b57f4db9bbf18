"""Shared fixtures: a small real CIFAR-10 subset written as shards."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data_prep.writer import WriteOptions, write_shards
from tests.paths import CIFAR10


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


ENGINE_STEPS = 10  # steps of the engine-parity runs (sharded engines against DDP)


@pytest.fixture(scope="session")
def ddp_reference(
    tmp_path_factory: pytest.TempPathFactory, cifar_train_shards: Path
) -> Callable[..., Path]:
    """``ddp_reference(method, *overrides)``: the run directory of a 2-process fp32 DDP run of
    the debug recipe for ``ENGINE_STEPS`` steps, trained once per session and argument list."""
    from tests.launch import overrides, train_cli

    cache: dict[tuple[str, ...], Path] = {}

    def get(method: str, *extra: str) -> Path:
        key = (method, *extra)
        if key not in cache:
            run_dir = tmp_path_factory.mktemp(f"ddp-{method}")
            args = ["engine.name=ddp", "engine.precision=fp32", *extra]
            train_cli(method, *overrides(cifar_train_shards, run_dir, ENGINE_STEPS, *args))
            cache[key] = run_dir
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def private_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``XDG_CACHE_HOME`` in a temporary directory: the eval feature cache (default
    ``$XDG_CACHE_HOME/sslpipe/features``) of the tests, their subprocesses and Slurm jobs never
    touches the user's."""
    root = tmp_path_factory.mktemp("xdg_cache")
    os.environ["XDG_CACHE_HOME"] = str(root)
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA; without it they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
