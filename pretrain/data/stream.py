"""The deterministic, resumable training sample stream over WebDataset tar shards.

The shards are plain WebDataset tars (``<key>.jpg``, ``<key>.cls``, ``<key>.json``) read with
:func:`data_prep.reader.iter_tar_samples`; the stages are our own (not ``webdataset``'s
pipeline) because exact resume needs every random choice to be a function of a few integers:

1. **Epochs.** The stream is infinite: epochs ``start_epoch, start_epoch + 1, ...``.
2. **Shards.** Epoch ``e`` visits the shards in the order ``shard_order(seed, e)``. With at
   least as many shards as global workers ``G``, worker ``g`` reads ``order[g::G]``; with fewer,
   every worker reads all shards and keeps the samples whose global index ``i % G == g``.
3. **Shuffle.** A reservoir of ``shuffle_buffer`` raw (undecoded) samples with its own
   ``Random(seed, e, g, G)``, reset every epoch: the emitted order of epoch ``e`` depends only on
   ``(seed, e, g, G)``.
4. **Filter.** Samples already consumed before the checkpoint (``consumed[e]``, a bitmap over
   global indices) are dropped here, after the shuffle. A same-layout resume therefore replays
   exactly the continuation of the interrupted run; a resume with another layout covers exactly
   the samples not yet consumed. A shard whose kept samples are all consumed is not even read:
   placeholders keep the reservoir's random draws identical.
5. **Decode + views.** The CPU generator is seeded with ``sample_seed(seed, e, index)`` before
   the view maker runs, so a sample's augmentation never depends on the worker layout. A view
   function with ``takes_bytes = True`` (the device pipeline, :mod:`pretrain.data.pipeline`)
   gets the encoded image bytes instead of a decoded image and only draws the parameters; its
   ``collate`` groups the samples into the batch.
6. **Batch.** ``batch_size`` samples per batch, collated in the worker (batches may cross
   epochs). Corrupt samples are logged, counted and reported in ``skipped`` so the trainer's
   bitmap accounts for them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_prep.manifest import Manifest, ShardInfo
from data_prep.reader import RawSample, ShardReadError, decode_image, iter_tar_samples

log = logging.getLogger(__name__)

ViewFn = Callable[[Image.Image], list[torch.Tensor]]  # or bytes -> payload (takes_bytes)
T = TypeVar("T")
_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (blake2b; stable across processes/versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed for the views of sample ``index`` in ``epoch``."""
    return mix_seed("sample", seed, epoch, index)


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The permutation of ``range(num_shards)`` that epoch ``epoch`` visits shards in."""
    order = list(range(num_shards))
    random.Random(mix_seed("order", seed, epoch)).shuffle(order)
    return order


def worker_shards(order: list[int], g: int, num_global: int) -> tuple[list[int], bool]:
    """``(shards worker g reads, strided)``; ``strided`` means fewer shards than workers, so the
    worker reads every shard and keeps global indices ``i % num_global == g``."""
    if len(order) >= num_global:
        return order[g::num_global], False
    return list(order), True


def reservoir_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle with a buffer of ``size``: fill it, then emit a random slot per new item and put
    the item there; flush the rest in random order. The draws depend only on the item count."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class Item(NamedTuple):
    """A sample travelling through the reservoir. ``raw`` is None for a placeholder: a sample
    not read because it is already consumed, or lost to a shard read error (``error`` set)."""

    index: int
    shard: str
    raw: RawSample | None
    error: str | None = None
    counts: bool = False  # this lost sample carries its shard's one corrupt count


def sample_bytes(raw: RawSample) -> tuple[bytes, int]:
    """``(encoded image bytes, label)`` of a raw sample; label -1 when unlabelled."""
    _, data = raw.image_bytes()
    label = raw.label()
    return data, -1 if label is None else label


def decode_sample(raw: RawSample) -> tuple[Image.Image, int]:
    """``(RGB image, label)`` of a raw sample; label -1 when unlabelled. Raises on bad data."""
    data, label = sample_bytes(raw)
    return decode_image(data), label


def stack_views(payloads: list[list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Per-sample view lists -> ``{"views": [per view: [b, 3, H, W]]}``."""
    return {"views": [torch.stack(v) for v in zip(*payloads, strict=True)]}


class _Batcher:
    """Groups decoded samples into batch dicts and carries corrupt events to the next batch.
    ``collate`` turns the samples' payloads (view lists by default) into batch entries."""

    def __init__(self, size: int, collate: Callable[[list], dict] = stack_views) -> None:
        self.size = size
        self.collate = collate
        self.samples: list[tuple[list[torch.Tensor], int, int, int]] = []
        self.skipped: list[tuple[int, int]] = []
        self.corrupt = 0

    def add(self, views: list[torch.Tensor], label: int, index: int, epoch: int) -> dict | None:
        """Add one sample; returns a full batch dict when ``size`` samples are collected."""
        self.samples.append((views, label, index, epoch))
        return self._emit() if len(self.samples) == self.size else None

    def _emit(self) -> dict:
        payloads, labels, indices, epochs = zip(*self.samples, strict=True)
        batch = self.collate(list(payloads)) | {
            "label": torch.tensor(labels, dtype=torch.long),  # [b]
            "index": torch.tensor(indices, dtype=torch.long),  # [b]
            "epoch": torch.tensor(epochs, dtype=torch.long),  # [b]
            "skipped": torch.tensor(self.skipped, dtype=torch.long).reshape(-1, 2),  # [k, 2]
            "corrupt": self.corrupt,
        }
        self.samples, self.skipped, self.corrupt = [], [], 0
        return batch


class ShardStream(IterableDataset):
    """Infinite stream of batch dicts for one rank; each DataLoader worker is one global worker.

    Batch dict: ``views`` list of ``[b, 3, H, W]`` (one per view), ``label`` ``[b]`` (-1 when
    unlabelled), ``index`` ``[b]`` global indices, ``epoch`` ``[b]``, ``skipped`` ``[k, 2]``
    (epoch, index) of corrupt samples dropped since the previous batch, ``corrupt`` int.

    ``worker_offset`` rotates DataLoader worker ids onto logical workers, so that after a resume
    the DataLoader's first batch comes from the worker whose batch was due next.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        view_fn: ViewFn,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        consumed: Mapping[int, np.ndarray] | None = None,
        start_epoch: int = 0,
        worker_offset: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} or rank={rank}/{world_size}")
        self.shard_dir = Path(shard_dir)
        self.manifest = Manifest.load(shard_dir)
        self.offsets = self.manifest.shard_offsets()
        self.view_fn = view_fn
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.consumed = dict(consumed or {})
        self.start_epoch = start_epoch
        self.worker_offset = worker_offset

    def worker_slot(self) -> tuple[int, int]:
        """``(g, G)``: this process's global worker id and the global worker count."""
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * n + (wid + self.worker_offset) % n, self.world_size * n

    def __iter__(self) -> Iterator[dict]:
        g, num_global = self.worker_slot()
        return self.batches(g, num_global, protect_rng=get_worker_info() is None)

    def batches(self, g: int, num_global: int, protect_rng: bool = False) -> Iterator[dict]:
        """The batches of global worker ``g`` of ``num_global``. ``protect_rng`` restores the
        CPU RNG after each sample (set when running in the trainer's own process)."""
        if self.manifest.num_samples < num_global:
            raise ValueError(
                f"{self.shard_dir}: {self.manifest.num_samples} samples cannot feed "
                f"{num_global} workers (world_size x num_workers)"
            )
        if self.manifest.num_shards < num_global and g == 0:
            log.warning(
                "%s: %d shards for %d workers: every worker reads every shard and keeps 1/%d "
                "of the samples (write more shards to avoid the extra reading)",
                self.shard_dir, self.manifest.num_shards, num_global, num_global,
            )  # fmt: skip
        batcher = _Batcher(self.batch_size, getattr(self.view_fn, "collate", stack_views))
        for epoch in itertools.count(self.start_epoch):
            consumed = self.consumed.get(epoch)
            if consumed is not None and consumed.all():
                continue
            for item in self.epoch_items(epoch, g, num_global):
                batch = self._add(batcher, item, epoch, protect_rng)
                if batch is not None:
                    yield batch

    def epoch_items(self, epoch: int, g: int, num_global: int) -> Iterator[Item]:
        """Worker ``g``'s samples of ``epoch``: shuffled, with consumed ones filtered out."""
        consumed = self.consumed.get(epoch)
        order = shard_order(self.seed, epoch, self.manifest.num_shards)
        shards, strided = worker_shards(order, g, num_global)
        stride = (g, num_global) if strided else None
        items = itertools.chain.from_iterable(self.shard_items(s, stride, consumed) for s in shards)
        rng = random.Random(mix_seed("buffer", self.seed, epoch, g, num_global))
        for item in reservoir_shuffle(items, self.shuffle_buffer, rng):
            if consumed is None or not consumed[item.index]:
                yield item

    def shard_items(
        self, shard: int, stride: tuple[int, int] | None, consumed: np.ndarray | None
    ) -> Iterator[Item]:
        """The kept samples of one shard, in tar order (all, or ``i % G == g`` when strided)."""
        info, offset = self.manifest.shards[shard], self.offsets[shard]
        first, step = (0, 1) if stride is None else ((stride[0] - offset) % stride[1], stride[1])
        positions = range(first, info.num_samples, step)
        if (
            consumed is not None
            and consumed[offset + first : offset + info.num_samples : step].all()
        ):
            yield from (Item(offset + p, info.name, None) for p in positions)
            return
        read_upto, error = 0, None
        try:
            for raw in iter_tar_samples(self.shard_dir / info.name):
                if raw.position >= info.num_samples:
                    error = f"more samples than the manifest's {info.num_samples}"
                    break
                read_upto = raw.position + 1
                if raw.position in positions:
                    yield Item(offset + raw.position, info.name, raw)
        except ShardReadError as exc:
            error = str(exc)
        if error is None and read_upto < info.num_samples:
            error = f"shard ends after {read_upto} of {info.num_samples} samples"
        if error is not None:
            yield from self._lost_items(info, offset, positions, read_upto, error, stride)

    def _lost_items(
        self,
        info: ShardInfo,
        offset: int,
        positions: range,
        read_upto: int,
        error: str,
        stride: tuple[int, int] | None,
    ) -> Iterator[Item]:
        """Placeholders for the kept samples a shard error made unreadable. The first lost
        sample carries the shard's one corrupt count; the worker that owns it logs the error.
        (Nothing is lost only when a shard holds more samples than the manifest says: that is
        logged, not counted.)"""
        first_lost = offset + min(read_upto, info.num_samples - 1)
        if stride is None or first_lost % stride[1] == stride[0]:
            log.error("shard %s unreadable after %d samples: %s", info.name, read_upto, error)
        for p in positions:
            if p >= read_upto:
                yield Item(offset + p, info.name, None, error, counts=p == read_upto)

    def _add(self, batcher: _Batcher, item: Item, epoch: int, protect_rng: bool) -> dict | None:
        """Decode and augment one item into the batcher (or record it as skipped)."""
        if item.raw is None:
            batcher.skipped.append((epoch, item.index))
            batcher.corrupt += int(item.counts)
            return None
        seed = sample_seed(self.seed, epoch, item.index)
        encoded = getattr(self.view_fn, "takes_bytes", False)
        try:
            data, label = sample_bytes(item.raw)
            if encoded:  # the view function reads the header (bad bytes raise) and draws params
                views = self._views(data, seed, protect_rng)
            else:
                img = decode_image(data)
        except Exception as exc:  # any decoder failure on bad bytes: skip the sample
            log.warning(
                "corrupt sample %s in shard %s (index %d): %s: %s",
                item.raw.key, item.shard, item.index, type(exc).__name__, exc,
            )  # fmt: skip
            batcher.skipped.append((epoch, item.index))
            batcher.corrupt += 1
            return None
        if not encoded:  # outside the try: a failing transform is a bug, not a corrupt sample
            views = self._views(img, seed, protect_rng)
        return batcher.add(views, label, item.index, epoch)

    def _views(self, img: Image.Image | bytes, seed: int, protect_rng: bool) -> list[torch.Tensor]:
        if not protect_rng:
            torch.default_generator.manual_seed(seed)
            return self.view_fn(img)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.view_fn(img)
