"""How this process was started (plain, torchrun), and the process group set-up.

One code path for every launcher: ``init_distributed()`` reads the environment, initialises
``torch.distributed`` when there is more than one process, and returns a :class:`DistInfo`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process. ``world_size == 1`` means no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launcher: str = "plain"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launch() -> DistInfo:
    """Read rank, local rank and world size from torchrun's environment (or a plain start)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            launcher="torchrun",
        )
    return DistInfo()


def pick_device(info: DistInfo) -> torch.device:
    """``cuda:<local_rank>`` when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Detect the launch and, for more than one process, initialise the process group.

    NCCL on CUDA, gloo on the CPU. Idempotent: an existing process group is reused.
    """
    info = detect_launch()
    if info.distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("process group: %s, rank %d of %d", backend, info.rank, info.world_size)
    return info


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum each Python scalar over ranks in one collective (identity without a process group)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
