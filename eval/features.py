"""Frozen-backbone features of a labelled data set, ordered by global sample index.

Data comes from ``pretrain.data.loader.eval_loader`` (shard directories and image folders
alike), each rank reading its part; under ``torch.distributed`` the parts are gathered and put
back in global index order, so the features do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep.manifest import Manifest, is_shard_dir
from data_prep.reader import IMAGE_EXTS, iter_tar_samples
from eval.load import EvalInputError
from pretrain.backbones import Backbone
from pretrain.data.loader import eval_loader
from pretrain.data.views import ImageTransform, eval_transform

log = logging.getLogger(__name__)


def check_labelled(data_path: str | os.PathLike) -> None:
    """Raise :class:`EvalInputError` unless ``data_path`` is labelled data we can read.

    A shard directory is labelled when its first sample has a ``cls`` member; an image folder
    when it has class subfolders.
    """
    p = Path(data_path)
    if not p.is_dir():
        raise EvalInputError(f"data path does not exist or is not a directory: {data_path}")
    if is_shard_dir(p):
        manifest = Manifest.load(p)
        first = next((s for s in manifest.shards if s.num_samples > 0), None)
        sample = next(iter_tar_samples(p / first.name), None) if first else None
        if sample is None or sample.label() is None:
            raise EvalInputError(f"{data_path}: shard samples carry no labels (no .cls member)")
    elif not any(child.is_dir() for child in p.iterdir()):
        images = any(f.suffix.lower().lstrip(".") in IMAGE_EXTS for f in p.iterdir())
        what = "images but no class subfolders" if images else "no shards, no class subfolders"
        raise EvalInputError(f"{data_path}: no labels ({what})")


def _transform(
    image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> ImageTransform:
    """Resize + center-crop + normalise; 32 px data is used as is, larger sizes at ratio 0.875."""
    resize = image_size if image_size <= 64 else round(image_size / 0.875)
    stats = {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    return eval_transform(image_size, resize, **stats)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.inference_mode()
def _extract_local(
    backbone: Backbone, loader: Iterable[dict], device: torch.device, max_samples: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(feats [n, D], labels [n], index [n])``; stops past ``max_samples``."""
    limit = max_samples if max_samples is not None else sys.maxsize
    feats, labels, index = [], [], []
    for batch in loader:
        idx = batch["index"]  # [b]
        keep = idx < limit  # [b]
        if not keep.any():
            break  # each rank reads in increasing global index: nothing below the limit is left
        images = batch["image"][keep].to(device, non_blocking=True)  # [b', 3, H, W]
        images = images.contiguous(memory_format=torch.channels_last)  # faster convs, CPU and GPU
        feats.append(backbone(images).float())  # [b', D]
        labels.append(batch["label"][keep].to(device))
        index.append(idx[keep].to(device))
    if not feats:
        dim = backbone.embed_dim
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.zeros(0, dim, device=device), empty, empty.clone()
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(index).long()


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t [n_r, ...]`` over ranks (row counts may differ) -> ``[sum n_r, ...]``."""
    world = dist.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def gather_by_index(
    feats: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather every rank's rows (when distributed), sort by global index, drop duplicate indices.

    ``feats [n, D]``, ``labels [n]``, ``index [n]`` -> the same, for all ranks, sorted by index.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        feats, labels, index = (_all_gather_rows(t) for t in (feats, labels, index))
    order = torch.argsort(index, stable=True)
    index = index[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]  # padding samplers may repeat an index
    return feats[order][first], labels[order][first], index[first]


def extract_raw_features(
    backbone: Backbone,
    data_path: str | os.PathLike,
    image_size: int,
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled backbone features ``[N, D]`` (float32, not normalised), labels ``[N]`` and global
    sample indices ``[N]`` (long) of ``data_path``, gathered over ranks, in index order.

    Arguments as :func:`extract_features`.
    """
    check_labelled(data_path)
    device = torch.device(device)
    rank, world = _rank_and_world()
    transform = _transform(image_size, mean, std)
    try:
        loader = eval_loader(str(data_path), transform, batch_size, num_workers, rank, world)
    except FileNotFoundError as exc:  # ImageFolder: class folders without images
        raise EvalInputError(f"{data_path}: {exc}") from exc
    was_training = backbone.training
    backbone.eval().to(device, memory_format=torch.channels_last)
    try:
        feats, labels, index = _extract_local(backbone, loader, device, max_samples)
    finally:
        backbone.train(was_training)
    feats, labels, index = gather_by_index(feats, labels, index)
    if labels.numel() and int(labels.min()) < 0:
        raise EvalInputError(f"{data_path}: some samples carry no label")
    log.info("features of %s: %s (rank %d of %d)", data_path, tuple(feats.shape), rank, world)
    return feats, labels, index


def extract_features(
    backbone: Backbone,
    data_path: str | os.PathLike,
    image_size: int,
    batch_size: int,
    num_workers: int,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features ``[N, D]`` (float32) and labels ``[N]`` (long) of ``data_path``.

    ``f_i = g(x_i) / ||g(x_i)||_2`` with ``g`` the backbone in eval mode (pooled features),
    for the first ``max_samples`` samples by global index (all when ``None``), in index order.
    Normalisation statistics default to those of ``pretrain.data.views.eval_transform``.
    """
    feats, labels, _ = extract_raw_features(
        backbone, data_path, image_size, batch_size, num_workers, max_samples, device, mean, std
    )
    return F.normalize(feats, dim=1), labels


def input_options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of the feature extractors that come from the common CLI options."""
    return {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": device,
        "mean": args.mean,
        "std": args.std,
    }


def cached_train_test_features(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str, cache
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Raw ``(features, labels, indices)`` of ``args.train`` and ``args.test``, each read from
    ``cache`` (an ``eval.linear.FeatureCache``) or extracted once and stored there."""
    from eval.linear import cache_key
    from eval.load import weights_sha256

    sha = weights_sha256(args.backbone)
    common = input_options(args, device)

    def features(split: str, data: str, limit: int | None) -> tuple[torch.Tensor, ...]:
        key = cache_key(sha, data, split, args.image_size, args.mean, args.std, limit, init)
        return cache.get(
            key, lambda: extract_raw_features(backbone, data, max_samples=limit, **common)
        )

    return features("train", args.train, args.max_train), features("test", args.test, args.max_test)
