"""The training loader: a DataLoader over :class:`ShardStream` that tracks the data position.

Every batch handed to the trainer is recorded in per-epoch bitmaps (see
:mod:`pretrain.data.position`); batches prefetched by workers but never handed out are not, so a
resume re-produces them. ``state_dict()`` is collective under ``torch.distributed``.

Batch order: with an IterableDataset and N workers the DataLoader returns batches round-robin
from workers 0..N-1. Every worker stream is infinite, so no worker ever ends and the sequence is
deterministic; the state remembers whose batch is due next so a resume continues the rotation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_prep.manifest import Manifest
from pretrain.data import position
from pretrain.data.eval_data import EvalLoader, eval_loader
from pretrain.data.stream import ShardStream, ViewFn

__all__ = ["EvalLoader", "TrainLoader", "eval_loader"]

log = logging.getLogger(__name__)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class TrainLoader:
    """Infinite, exactly resumable training batches for one rank.

    Yields the :class:`ShardStream` batch dicts (``views`` list of ``[b, 3, H, W]``, ``label``,
    ``index``, ``epoch`` ``[b]``, ``skipped`` ``[k, 2]``, ``corrupt`` int) with
    ``b = per_device_batch``; each batch is collated inside one worker.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        view_fn: ViewFn,
        per_device_batch: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int = 1000,
        state: Mapping | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        if per_device_batch < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"TrainLoader: bad per_device_batch={per_device_batch}, "
                f"num_workers={num_workers} or rank={rank} of world_size={world_size}"
            )
        self.shard_dir = Path(shard_dir)
        self.manifest = Manifest.load(shard_dir)
        self.num_samples = self.manifest.num_samples
        self.view_fn = view_fn
        self.per_device_batch = per_device_batch
        self.num_workers = num_workers
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.prefetch_factor = prefetch_factor
        self.corrupt_count = 0
        self._bitmaps: position.Bitmaps = {}
        self._start_epoch = 0
        self._next_worker = 0
        self._seen_local = 0  # handed out by this rank since construction / load
        self._seen_share = 0  # this rank's share of the restored run total
        if state is not None:
            self.load_state_dict(state)

    @property
    def samples_seen(self) -> int:
        """Samples handed out by this rank (including its equal share of a restored total)."""
        return self._seen_share + self._seen_local

    @property
    def _slots(self) -> int:
        return max(self.num_workers, 1)

    def dataset(self) -> ShardStream:
        """The stream for the current position (a snapshot: later consumption does not leak in)."""
        return ShardStream(
            self.shard_dir,
            self.view_fn,
            self.per_device_batch,
            self.seed,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=self.shuffle_buffer,
            consumed={e: b.copy() for e, b in self._bitmaps.items()},
            start_epoch=self._start_epoch,
            worker_offset=self._next_worker,
        )

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on; each is recorded as consumed when yielded."""
        workers = self.num_workers
        loader = DataLoader(
            self.dataset(),
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from the global RNG, which
            # the trainer restores on resume (a draw there would shift every later random op).
            generator=torch.Generator().manual_seed(self.seed),
        )
        for batch in loader:
            self._record(batch)
            yield batch

    def _record(self, batch: Mapping) -> None:
        self._seen_local += position.record_batch(self._bitmaps, self.num_samples, batch)
        self.corrupt_count += int(batch["corrupt"])
        self._next_worker = (self._next_worker + 1) % self._slots

    def local_state(self) -> dict:
        """This rank's data position alone (no collectives); merge ranks with
        :func:`pretrain.data.position.merge_states`."""
        return {
            "version": position.STATE_VERSION,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "epochs": {e: position.pack_bitmap(b) for e, b in sorted(self._bitmaps.items())},
            "start_epoch": self._start_epoch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "samples_seen": self.samples_seen,
            "next_worker": self._next_worker,
            "batch_size": self.per_device_batch,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """The data position of all ranks. COLLECTIVE when torch.distributed is initialized:
        every rank must call it at the same step. Full epochs are dropped (start_epoch moves)."""
        if not _dist_ready():
            state = position.merge_states([self.local_state()])
        else:
            bitmaps = position.all_reduce_bitmaps(
                self._bitmaps, self.num_samples, self._start_epoch
            )
            state = self.local_state()
            state["epochs"] = {e: position.pack_bitmap(b) for e, b in bitmaps.items()}
            state["samples_seen"] = position.all_reduce_sum(self.samples_seen)
            state = position.merge_states([state])
        self._bitmaps = {
            int(e): position.unpack_bitmap(b, self.num_samples) for e, b in state["epochs"].items()
        }
        self._start_epoch = state["start_epoch"]
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a position from :meth:`state_dict` (call before iterating)."""
        self._check_state(state)
        self._bitmaps = {
            int(e): position.unpack_bitmap(b, self.num_samples) for e, b in state["epochs"].items()
        }
        self._start_epoch = int(state["start_epoch"])
        same_layout = (state["world_size"], state["num_workers"]) == (
            self.world_size,
            self.num_workers,
        )
        self._next_worker = int(state.get("next_worker", 0)) if same_layout else 0
        total = int(state["samples_seen"])
        share, extra = divmod(total, self.world_size)
        self._seen_share = share + int(self.rank < extra)
        self._seen_local = 0
        if not same_layout:
            log.info(
                "data position from world_size=%s num_workers=%s resumed with %d x %d: the rest "
                "of the open epochs is covered exactly once, in a different order",
                state["world_size"], state["num_workers"], self.world_size, self.num_workers,
            )  # fmt: skip

    def _check_state(self, state: Mapping) -> None:
        if state.get("version") != position.STATE_VERSION:
            raise ValueError(f"unsupported data position version {state.get('version')!r}")
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"data position was saved for {state['num_samples']} samples but "
                f"{self.shard_dir} holds {self.num_samples}: resume with the same data.train"
            )
        if state["seed"] != self.seed:
            log.warning(
                "data position saved with seed %s, resuming with seed %s: coverage of open "
                "epochs stays exact but the order differs",
                state["seed"], self.seed,
            )  # fmt: skip
        mine = {"batch_size": self.per_device_batch, "shuffle_buffer": self.shuffle_buffer}
        for key, value in mine.items():
            if state.get(key, value) != value:
                log.warning("data position saved with %s=%s, now %s: batches will differ",
                            key, state[key], value)  # fmt: skip
