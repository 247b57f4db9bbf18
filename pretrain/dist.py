"""How this process was started (plain, torchrun, srun), and the process group set-up.

One code path for every launcher: ``init_distributed()`` reads the environment, initialises
``torch.distributed`` when there is more than one process, and returns a :class:`DistInfo`.

- torchrun (also torchrun inside an ``srun`` task): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT`` as torchrun exports them.
- ``srun`` with one task per device: ``SLURM_PROCID``, ``SLURM_LOCALID`` and
  ``SLURM_STEP_NUM_TASKS`` (set for the tasks of an ``srun`` step, not for the batch script
  itself, so a plain ``python`` in a batch script stays one process). The master address is
  ``MASTER_ADDR`` when exported, else the first host of ``SLURM_STEP_NODELIST`` (or
  ``SLURM_JOB_NODELIST``); the port is ``MASTER_PORT`` when exported, else derived from the
  job id so that concurrent jobs on one node do not collide.
"""

from __future__ import annotations

import gc
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
    """Read rank, local rank and world size from torchrun's or srun's environment (or a plain
    start). For srun, also export ``MASTER_ADDR``/``MASTER_PORT`` (and ``RANK``...) so that
    ``init_process_group``'s env:// rendezvous finds them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            launcher="torchrun",
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        info = DistInfo(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            launcher="srun",
        )
        if info.world_size > 1:
            export_slurm_rendezvous(info)
        return info
    return DistInfo()


def export_slurm_rendezvous(info: DistInfo) -> None:
    """Set the variables ``env://`` reads, from the Slurm step (exported values win)."""
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    env.setdefault("MASTER_ADDR", expand_nodelist(nodelist)[0])
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size))
    env.update(LOCAL_RANK=str(info.local_rank))


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list → host names, in order:
    ``"gpu[01-03,07],cpu5"`` → ``["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]``
    (zero padding kept; several bracket groups per name expand as a product)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_host(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, ranges, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{prefix}{n:0{width}d}")
    return [name + tail for name in names for tail in _expand_host(rest)] if rest else names


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


def shutdown(synchronize: bool = True) -> None:
    """End the process group cleanly: wait for every rank (so none exits while another still
    works, e.g. rank 0 exporting), free unreachable modules and the pending collective handles
    they hold while the interpreter is fully alive, then destroy the group. Without this, gloo
    worker threads were seen to abort a rank at exit ("terminate called without an active
    exception") under FSDP2 and DeepSpeed."""
    if not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


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
