"""Labelled training data for fine-tuning: augmented, shuffled samples of a chosen index set.

Both sources ``eval`` reads (shard directories and class-folder trees) are indexed the same way
as :mod:`pretrain.data.eval_data` (manifest global index / position in ``ImageFolder.samples``),
so an index list (``--max-train``, a semi-supervised subset) means the same images everywhere.

:class:`LabelledTrainStream` yields ``(image [3, S, S], label, index)`` for the kept indices,
once per epoch, in a seeded order: shard directories visit their shards in
``shard_order(seed, epoch)`` (worker ``w`` of ``N`` reads shards ``w::N``, or every shard and
indices ``i % N == w`` when there are fewer shards than workers) through a reservoir shuffle;
image folders take a seeded permutation of the kept indices (worker ``w`` its ``w::N`` part).
Augmentation: random resized crop (scale 0.08-1, bicubic) + horizontal flip at the eval size.
Single-process only (no rank split).
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

from data_prep.manifest import Manifest, is_shard_dir
from data_prep.reader import ShardReadError, decode_image, iter_tar_samples, split_member_name
from pretrain.data.stream import decode_sample, mix_seed, reservoir_shuffle, shard_order

log = logging.getLogger(__name__)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Random resized crop (scale 0.08-1, bicubic) + flip at ``size`` px, then normalise."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(tuple(mean), tuple(std)),
        ]
    )


def _shard_labels(path: Path) -> list[int]:
    """Labels of one shard in sample order, reading only the ``.cls`` members (seeking past
    the images); -1 for a sample without one."""
    labels: list[int] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key != last_key:
                labels.append(-1)
                last_key = key
            if ext == "cls":
                labels[-1] = int(tar.extractfile(member).read().decode().strip())
    return labels


def dataset_labels(data_path: str | Path) -> torch.Tensor:
    """The label of every sample ``[N]`` (long), by global index (-1 where unlabelled)."""
    p = Path(data_path)
    if is_shard_dir(p):
        manifest = Manifest.load(p)
        out: list[int] = []
        for shard in manifest.shards:
            labels = _shard_labels(p / shard.name)[: shard.num_samples]
            out += labels + [-1] * (shard.num_samples - len(labels))
        return torch.tensor(out, dtype=torch.long)
    return torch.tensor([label for _, label in ImageFolder(str(p)).samples], dtype=torch.long)


class LabelledTrainStream(IterableDataset):
    """Augmented ``(image, label, index)`` of the indices in ``keep``, reshuffled each epoch
    (call :meth:`set_epoch`); see the module docstring for the order."""

    def __init__(
        self,
        data_path: str | Path,
        keep: Sequence[int],
        transform: T.Compose,
        seed: int = 0,
        shuffle_buffer: int = 2000,
    ) -> None:
        super().__init__()
        self.path = Path(data_path)
        self.keep = sorted(set(int(i) for i in keep))
        self.keep_set = set(self.keep)
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.shards = is_shard_dir(self.path)
        self.samples = None if self.shards else ImageFolder(str(self.path)).samples

    def __len__(self) -> int:
        return len(self.keep)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        # augmentation randomness: a per-(seed, epoch, worker) stream of torch's global RNG
        torch.manual_seed(mix_seed("finetune", self.seed, self.epoch, wid))
        if self.shards:
            yield from self._shard_samples(wid, nw)
        else:
            yield from self._folder_samples(wid, nw)

    def _folder_samples(self, wid: int, nw: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        order = list(self.keep)
        random.Random(mix_seed("folder", self.seed, self.epoch)).shuffle(order)
        for index in order[wid::nw]:
            path, label = self.samples[index]
            try:
                img = decode_image(Path(path).read_bytes())
            except Exception as exc:  # unreadable file: skip it
                log.warning("corrupt image %s: %s", path, exc)
                continue
            yield self.transform(img), label, index

    def _shard_samples(self, wid: int, nw: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        manifest = Manifest.load(self.path)
        offsets = manifest.shard_offsets()
        order = shard_order(self.seed, self.epoch, manifest.num_shards)
        strided = len(order) < nw
        mine = order if strided else order[wid::nw]

        def raw_items():
            for s in mine:
                try:
                    for raw in iter_tar_samples(self.path / manifest.shards[s].name):
                        index = offsets[s] + raw.position
                        if index in self.keep_set and (not strided or index % nw == wid):
                            yield index, raw
                except ShardReadError as exc:
                    log.error("%s; going on with the next shard", exc)

        rng = random.Random(mix_seed("reservoir", self.seed, self.epoch, wid, nw))
        for index, raw in reservoir_shuffle(raw_items(), self.shuffle_buffer, rng):
            try:
                img, label = decode_sample(raw)
            except Exception as exc:  # corrupt bytes: skip the sample
                log.warning("corrupt sample %s (index %d): %s", raw.key, index, exc)
                continue
            yield self.transform(img), label, index


def train_loader(stream: LabelledTrainStream, batch_size: int, num_workers: int) -> DataLoader:
    """Batches ``(images [b, 3, S, S], labels [b], indices [b])`` of ``stream``; a worker's
    last partial batch is dropped (mixup needs even, full batches)."""
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
