"""Atomic, complete, exactly-resumable checkpoints (contract in DESIGN.md).

Layout: ``run_dir/checkpoints/step-<N>/`` with ``state.pt`` (loader position, resolved config,
engine state and, for replicated engines, model(s), method buffers and optimizer; written by
rank 0), whatever a sharded engine writes beside it (``dcp/`` for FSDP, ``deepspeed/``),
``rank-<r>.pt`` (each rank's RNG states) and ``meta.json`` (step, world size, engine). Everything is written into ``.step-<N>.tmp/`` and renamed
when all ranks are done, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.dist import barrier, rank, world_size

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed, with ``meta.json``), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, Python) as tensors/plain types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    build_state: Callable[[Path], dict[str, Any]],
    keep: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Every rank runs ``build_state(tmp_dir)`` (sharded
    engines write their shards there) and writes its RNG file; rank 0 writes the returned
    state as ``state.pt`` plus ``meta.json``; then the directory is renamed into place."""
    root = checkpoint_root(run_dir)
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    main_state = build_state(tmp)
    _save_file({"rng": rng_state()}, tmp / f"rank-{rank()}.pt")
    if rank() == 0:
        _save_file(main_state, tmp / "state.pt")
        info = {"step": step, "world_size": world_size()} | (meta or {})
        (tmp / "meta.json").write_text(json.dumps(info) + "\n")
    barrier()
    if rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(run_dir, keep)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint: step, world size, engine (``ddp`` when not recorded)."""
    meta = json.loads((path / "meta.json").read_text())
    meta.setdefault("engine", "ddp")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(main state, this rank's RNG state or ``None`` when it was saved by fewer ranks)."""
    main_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rank_file = path / f"rank-{rank()}.pt"
    rank_state = (
        torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.exists() else None
    )
    return main_state, rank_state


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove stale temporary directories."""
    found = list_checkpoints(run_dir)
    for _, p in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoint_root(run_dir).glob(".step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
