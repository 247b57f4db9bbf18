"""Run a function in N gloo processes on the CPU and collect what each returns (for tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.dist import shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
        ok = True
    finally:
        shutdown(synchronize=ok)  # a failed rank must not wait for the others


def run_distributed(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` spawned processes; returns their results by rank.

    ``fn`` must be importable (module level) and its result saveable with ``torch.save``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world, free_port(), fn, args, out_dir),
            nprocs=world,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world)]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run a block with torch's default dtype set (float64 for tight 2-vs-1 comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
