"""The data position that goes into a checkpoint: which samples the trainer has received.

Per open epoch, a boolean bitmap over global sample indices (``Manifest`` numbering) marks every
sample handed to the trainer, plus every corrupt sample the stream skipped. Epochs below
``start_epoch`` are complete; an epoch whose bitmap fills up is dropped and ``start_epoch``
advances. Bitmaps of several ranks merge by OR, so a checkpoint taken with one world size can be
resumed with another and still sees every sample of the open epochs exactly once.

State dict layout (``version`` 1)::

    {"version": 1, "seed": int, "num_samples": int,
     "epochs": {epoch: np.packbits(bitmap).tobytes()},
     "start_epoch": int, "world_size": int, "num_workers": int, "samples_seen": int,
     "next_worker": int, "batch_size": int, "shuffle_buffer": int}

``samples_seen`` counts samples handed out by all ranks over the whole run. ``next_worker`` is
the DataLoader worker whose batch comes next (ranks step in lockstep, so it is the same on all
ranks); it makes a resume with the same layout replay the exact batch sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

STATE_VERSION = 1

Bitmaps = dict[int, np.ndarray]


def pack_bitmap(bits: np.ndarray) -> bytes:
    """Bool ``[num_samples]`` -> packed bytes (``ceil(num_samples / 8)`` of them)."""
    return np.packbits(bits.astype(bool)).tobytes()


def unpack_bitmap(data: bytes, num_samples: int) -> np.ndarray:
    """Packed bytes -> bool ``[num_samples]``; the inverse of :func:`pack_bitmap`."""
    packed = np.frombuffer(data, dtype=np.uint8)
    if packed.size != (num_samples + 7) // 8:
        raise ValueError(
            f"data position bitmap has {packed.size} bytes; {num_samples} samples need "
            f"{(num_samples + 7) // 8}"
        )
    return np.unpackbits(packed, count=num_samples).astype(bool)


def record_consumed(
    bitmaps: Bitmaps, num_samples: int, epochs: np.ndarray, indices: np.ndarray
) -> None:
    """Mark ``(epochs[i], indices[i])`` consumed in ``bitmaps`` (created per epoch on demand)."""
    for epoch in np.unique(epochs):
        bits = bitmaps.get(int(epoch))
        if bits is None:
            bits = bitmaps[int(epoch)] = np.zeros(num_samples, dtype=bool)
        bits[indices[epochs == epoch]] = True


def record_batch(bitmaps: Bitmaps, num_samples: int, batch: Mapping) -> int:
    """Record a stream batch (its ``epoch``/``index`` and ``skipped`` rows); returns its size."""
    epochs = batch["epoch"].numpy()
    record_consumed(bitmaps, num_samples, epochs, batch["index"].numpy())
    skipped = batch["skipped"].numpy().reshape(-1, 2)
    if len(skipped):
        record_consumed(bitmaps, num_samples, skipped[:, 0], skipped[:, 1])
    return len(epochs)


def compact(bitmaps: Bitmaps, start_epoch: int) -> tuple[Bitmaps, int]:
    """Drop full epochs from the front and anything below ``start_epoch``; returns the new
    ``(bitmaps, start_epoch)``. Full epochs after an open one are kept (the stream skips them)."""
    while start_epoch in bitmaps and bitmaps[start_epoch].all():
        start_epoch += 1
    return {e: b for e, b in bitmaps.items() if e >= start_epoch}, start_epoch


def merge_states(states: Sequence[Mapping]) -> dict:
    """OR-merge the data positions of several ranks (each from ``TrainLoader.local_state()``).

    Bitmaps are OR-ed, ``samples_seen`` summed, full leading epochs dropped. All states must
    describe the same shard set (``num_samples``) and seed.
    """
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    for s in states[1:]:
        if s["num_samples"] != first["num_samples"] or s["seed"] != first["seed"]:
            raise ValueError("cannot merge data positions of different shard sets or seeds")
    n = first["num_samples"]
    bitmaps: Bitmaps = {}
    for s in states:
        for e, data in s["epochs"].items():
            bits = unpack_bitmap(data, n)
            bitmaps[int(e)] = bitmaps[int(e)] | bits if int(e) in bitmaps else bits
    bitmaps, start = compact(bitmaps, min(s["start_epoch"] for s in states))
    merged = dict(first)
    merged.update(
        epochs={e: pack_bitmap(b) for e, b in sorted(bitmaps.items())},
        start_epoch=start,
        samples_seen=sum(int(s["samples_seen"]) for s in states),
    )
    return merged


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_bitmaps(bitmaps: Bitmaps, num_samples: int, start_epoch: int) -> Bitmaps:
    """COLLECTIVE: OR the bitmaps of all ranks (``all_reduce`` MAX over ``uint8 [num_samples]``
    per epoch). Every rank must call it at the same time with the same ``start_epoch``."""
    import torch.distributed as dist

    device = _collective_device()
    last = torch.tensor([max(bitmaps, default=start_epoch - 1)], device=device)
    dist.all_reduce(last, op=dist.ReduceOp.MAX)
    merged: Bitmaps = {}
    for epoch in range(start_epoch, int(last.item()) + 1):
        local = bitmaps.get(epoch, np.zeros(num_samples, dtype=bool))
        t = torch.from_numpy(local.astype(np.uint8)).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        bits = t.cpu().numpy().astype(bool)
        if bits.any():
            merged[epoch] = bits
    return merged


def all_reduce_sum(value: int) -> int:
    """COLLECTIVE: the sum of an int over all ranks."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item())
