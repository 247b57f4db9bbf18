"""Eval-time data: every sample exactly once, in global index order, for feature extraction.

Two sources, chosen by :func:`data_prep.manifest.is_shard_dir`:

* a shard directory: rank ``r`` of ``W`` takes shards ``r::W``; index = the manifest's global
  index;
* an image folder with one subfolder per class (torchvision ``ImageFolder``): rank ``r`` takes a
  contiguous slice of ``ImageFolder.samples``; index = position in ``ImageFolder.samples``.

With N workers, a rank's sample sequence is cut into batches of ``batch_size`` and batch ``k``
is built by worker ``k % N``; the DataLoader's round-robin then returns them in order. Corrupt
samples are logged and left out, so a batch can be smaller than ``batch_size``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder

from data_prep.manifest import Manifest, is_shard_dir
from data_prep.reader import RawSample, ShardReadError, decode_image, iter_tar_samples
from pretrain.data.stream import decode_sample

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
Sample = tuple[torch.Tensor, int, int]  # (image [3, H, W], label, index)


def collate_samples(samples: list[Sample | None]) -> dict | None:
    """Stack the valid samples: ``{"image": [b, 3, H, W], "label": [b], "index": [b]}``;
    None when every sample of the batch was corrupt."""
    valid = [s for s in samples if s is not None]
    if not valid:
        return None
    images, labels, indices = zip(*valid, strict=True)
    return {
        "image": torch.stack(images),
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
    }


class ShardEvalStream(IterableDataset):
    """The samples of a rank's shards (``r::W``) in global index order, as batches (or None
    for a batch whose samples were all corrupt, so the worker rotation stays in step)."""

    def __init__(
        self,
        shard_dir: str | Path,
        transform: Transform,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.manifest = Manifest.load(shard_dir)
        self.transform = transform
        self.batch_size = batch_size
        self.shards = list(range(rank, self.manifest.num_shards, world_size))
        self.num_samples = sum(self.manifest.shards[s].num_samples for s in self.shards)

    def __iter__(self) -> Iterator[dict | None]:
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        return self.batches(wid, n)

    def batches(self, worker: int, num_workers: int) -> Iterator[dict | None]:
        """Batches ``k = worker, worker + num_workers, ...`` of the rank's sequence."""
        expected = range(worker, math.ceil(self.num_samples / self.batch_size), num_workers)
        done = 0  # how many of `expected` were emitted
        groups = itertools.groupby(self._entries(), key=lambda e: e[0] // self.batch_size)
        for k, group in groups:
            if k % num_workers != worker:
                continue
            while expected[done] < k:  # batches lost entirely to a shard error
                yield None
                done += 1
            yield collate_samples([self._sample(raw, index) for _, index, raw in group])
            done += 1
        yield from itertools.repeat(None, len(expected) - done)

    def _entries(self) -> Iterator[tuple[int, int, RawSample]]:
        """``(position in the rank's sequence, global index, raw)`` of every readable sample."""
        offsets = self.manifest.shard_offsets()
        start = 0
        for s in self.shards:
            info = self.manifest.shards[s]
            try:
                for raw in iter_tar_samples(self.shard_dir / info.name):
                    if raw.position >= info.num_samples:
                        log.error("shard %s holds more samples than its manifest", info.name)
                        break
                    yield start + raw.position, offsets[s] + raw.position, raw
            except ShardReadError as exc:
                log.error("shard %s: %s; going on with the next shard", info.name, exc)
            start += info.num_samples

    def _sample(self, raw: RawSample, index: int) -> Sample | None:
        try:
            img, label = decode_sample(raw)
        except Exception as exc:  # any decoder failure on bad bytes: skip the sample
            log.warning(
                "corrupt sample %s (index %d): %s: %s", raw.key, index, type(exc).__name__, exc
            )
            return None
        return self.transform(img), label, index


class FolderEvalDataset(Dataset):
    """A contiguous slice (rank ``r`` of ``W``) of an ``ImageFolder``; items are
    ``(image [3, H, W], label, index)`` or None for an unreadable file."""

    def __init__(
        self, root: str | Path, transform: Transform, rank: int = 0, world_size: int = 1
    ) -> None:
        folder = ImageFolder(str(root))
        self.samples = folder.samples
        self.classes = folder.classes
        n = len(self.samples)
        self.indices = range(n * rank // world_size, n * (rank + 1) // world_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample | None:
        index = self.indices[i]
        path, label = self.samples[index]
        try:
            img = decode_image(Path(path).read_bytes())
        except Exception as exc:  # unreadable or corrupt file: skip it
            log.warning("corrupt image %s (index %d): %s: %s", path, index, type(exc).__name__, exc)
            return None
        return self.transform(img), label, index


class EvalLoader:
    """Iterable of eval batches ``{"image": [b, 3, H, W], "label": [b], "index": [b]}`` in
    increasing ``index`` order; ``num_samples`` is this rank's sample count (corrupt included)."""

    def __init__(self, loader: DataLoader, num_samples: int) -> None:
        self.loader = loader
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[dict]:
        return (batch for batch in self.loader if batch is not None)


def eval_loader(
    path: str | Path,
    transform: Transform,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> EvalLoader:
    """Every sample of a shard directory or class-folder tree once, in index order (see the
    module docstring for how ranks split the data)."""
    common = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available()}
    if is_shard_dir(path):
        stream = ShardEvalStream(path, transform, batch_size, rank, world_size)
        return EvalLoader(DataLoader(stream, batch_size=None, **common), stream.num_samples)
    folder = FolderEvalDataset(path, transform, rank, world_size)
    loader = DataLoader(
        folder, batch_size=batch_size, shuffle=False, collate_fn=collate_samples, **common
    )
    return EvalLoader(loader, len(folder))
