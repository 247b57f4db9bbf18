"""Feature extraction for eval: ordering, limits, shard/folder agreement, labels, 2-process gather."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_prep.manifest import Manifest
from data_prep.reader import iter_tar_samples
from data_prep.writer import WriteOptions, write_shards
from eval.features import check_labelled, extract_features, gather_by_index
from eval.load import EvalInputError
from pretrain.backbones import BackboneConfig, build_backbone
from tests.paths import CIFAR10

CIFAR = CIFAR10
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"no CIFAR-10 image folder at {CIFAR}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 4 real CIFAR-10 test images as an image folder."""
    root = tmp_path_factory.mktemp("feat") / "folder"
    for name in ("cat", "dog", "ship"):
        (root / name).mkdir(parents=True)
        for image in sorted((CIFAR / "test" / name).iterdir())[:4]:
            shutil.copy(image, root / name / image.name)
    return root


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))


def extract(backbone, path, max_samples=None):
    return extract_features(backbone, path, 32, 5, 0, max_samples=max_samples)


def test_gather_by_index_sorts_and_drops_duplicates():
    index = torch.tensor([4, 0, 2, 0, 1, 3])
    feats = index.float().view(-1, 1).repeat(1, 3)  # [6, 3], row value = its index
    feats, labels, index = gather_by_index(feats, index * 10, index)
    assert index.tolist() == [0, 1, 2, 3, 4]
    assert labels.tolist() == [0, 10, 20, 30, 40]
    assert feats[:, 0].tolist() == [0, 1, 2, 3, 4]


@needs_cifar
def test_features_are_normalised_labelled_and_limited(backbone, folder):
    training = backbone.train()
    feats, labels = extract(backbone, folder)
    assert training.training  # the mode is restored
    assert feats.shape == (12, 512) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    assert labels.dtype == torch.long and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first, first_labels = extract(backbone, folder, max_samples=5)
    assert torch.equal(first, feats[:5]) and torch.equal(first_labels, labels[:5])
    # eval mode: the features of a sample do not depend on its batch
    single, _ = extract_features(backbone, folder, 32, 1, 0, max_samples=3)
    torch.testing.assert_close(single, feats[:3], atol=1e-5, rtol=0)


@needs_cifar
def test_shards_and_folder_give_the_same_features(backbone, folder, tmp_path):
    shards = tmp_path / "shards"
    write_shards(folder, shards, WriteOptions(shard_size=5))
    manifest = Manifest.load(shards)
    paths = [
        sample.meta()["path"]
        for shard in manifest.shards
        for sample in iter_tar_samples(shards / shard.name)
    ]
    assert len(paths) == 12 and manifest.num_shards == 3
    folder_paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
    order = torch.tensor([folder_paths.index(p) for p in paths])
    shard_feats, shard_labels = extract(backbone, shards)
    folder_feats, folder_labels = extract(backbone, folder)
    assert torch.equal(shard_labels, folder_labels[order])
    torch.testing.assert_close(shard_feats, folder_feats[order], atol=1e-5, rtol=0)


def test_check_labelled_rejects_missing_and_unlabelled(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        check_labelled(tmp_path / "missing")
    with pytest.raises(EvalInputError, match="no labels"):
        check_labelled(tmp_path)  # empty folder


@needs_cifar
def test_check_labelled_rejects_unlabelled_shards(folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((folder / "cat").iterdir()):
        shutil.copy(image, flat / image.name)
    with pytest.raises(EvalInputError, match="no labels"):
        check_labelled(flat)
    write_shards(flat, tmp_path / "shards", WriteOptions())
    with pytest.raises(EvalInputError, match="no labels"):
        check_labelled(tmp_path / "shards")
    check_labelled(folder)  # labelled: no error


def _two_rank_worker(rank: int, init_file: str, paths: list[str], out: str) -> None:
    torch.set_num_threads(1)  # forked children: one thread each on a small CPU machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        backbone = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
        results = [extract_features(backbone, p, 32, 2, 0, max_samples=11) for p in paths]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_cifar
def test_two_processes_gather_the_same_features_as_one(backbone, folder, tmp_path):
    # 3 shards: rank 0 reads shards 0 and 2, rank 1 shard 1, so the gather must reorder;
    # the folder is split into contiguous halves of unequal length after --max 11.
    shards = tmp_path / "shards"
    write_shards(folder, shards, WriteOptions(shard_size=5))
    paths = [str(folder), str(shards)]
    # fork: the children inherit the imported modules (spawn would re-import torch twice)
    mp.start_processes(
        _two_rank_worker,
        args=(str(tmp_path / "init"), paths, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    expected = [extract(backbone, p, max_samples=11) for p in paths]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for (feats, labels), (ref_feats, ref_labels) in zip(got, expected, strict=True):
            assert torch.equal(labels, ref_labels)
            torch.testing.assert_close(feats, ref_feats, atol=1e-5, rtol=0)


def test_class_folders_without_images_are_an_input_error(backbone, tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    with pytest.raises(EvalInputError, match="data"):
        extract_features(backbone, tmp_path / "data", 32, 4, 0)
