"""A FIFO queue of keys (MoCo, He et al. 2020, §3.2) kept as registered buffers.

The queue ``[K, D]`` and its write pointer are buffers, so they live in ``state_dict()`` and
come back exactly on resume. Every rank enqueues the *global* batch of keys (gathered in rank
order), so the queue is identical on every rank and equals the queue of one process holding the
whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """``size`` keys of dimension ``dim``; initialised to random unit vectors (as MoCo)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys [n, D]`` at the pointer (oldest entries first), wrapping around the end.

        Row ``i`` of ``keys`` goes to slot ``(ptr + i) mod K``; ``n > K`` keeps the last ``K``.
        """
        n = keys.shape[0]
        if n > self.size:
            self.enqueue(keys[: n - self.size])
            keys, n = keys[n - self.size :], self.size
        slots = (self.ptr + torch.arange(n, device=keys.device)) % self.size  # [n]
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
