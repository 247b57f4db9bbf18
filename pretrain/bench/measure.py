"""``python -m pretrain.bench RECIPE [a.b=c ...]``: training throughput of a recipe, per input.

Each input mode builds its own run with the trainer's :func:`~pretrain.train.build_run` in a
fresh temporary ``run.dir`` (no resume, no checkpoint, no export, no TensorBoard), trains
``--warmup`` untimed steps (compile, kernel selection, loader workers starting), then:

* ``--steps`` timed steps with the trainer's own :func:`~pretrain.train.step_once`, run as the
  trainer runs them, with no device synchronisation between steps (the device pipeline's decode
  and augmentation of the next batch overlap the current step's kernels, as in training):
  ``images_per_s`` and ``step_s`` come from their wall time (synchronised at both ends);
  ``data_wait_s`` is the host's mean time blocked in ``next(feed)`` (loader batch +
  ``run.inputs.views``), the trainer's ``data-wait``;
* ``--split-steps`` synchronised steps that split a step in two, one part after the other::

      t0; views = next(feed); sync; t1; step_once; sync; t2
      data_s = t1 - t0 (batch, decode, augment), compute_s = t2 - t1 (the model's step)

* one more step under ``FlopCounterMode`` to count the FLOPs of a step.

MFU is the achieved FLOP rate of ``compute_s`` over the rate of a large matmul measured on the
same device in the engine's compute dtype (not a datasheet number).
"""

from __future__ import annotations

import gc
import itertools
import logging
import platform
import resource
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pretrain.bench")

Feed = Generator[list[torch.Tensor], None, None]  # views on the device, one list per step
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class ModeResult:
    """One input mode's measurements (the report's ``results`` entries)."""

    input: str
    pipeline: str | None  # workers | device; None for synthetic
    steps: int
    global_batch: int
    images_per_s: float
    step_s: float  # wall time of the timed steps / steps
    data_wait_s: float  # mean host time blocked on the next views, timed steps
    data_wait_frac: float  # their sum over the wall time
    split_steps: int
    data_s: float  # mean synchronised time of batch + decode + augment, split steps
    compute_s: float  # mean synchronised time of the training step, split steps
    flops_per_step: int | None  # forward + backward of one step on one device
    achieved_tflops: float | None
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gb: float | None


@dataclass
class Measured:
    """What a mode measured: the timed steps' host data waits (s) and wall time, the split
    steps' synchronised data and compute times (s), and the peak memory of the mode."""

    waits: list[float] = field(default_factory=list)
    wall: float = 0.0
    data: list[float] = field(default_factory=list)
    computes: list[float] = field(default_factory=list)
    peak_memory_gb: float | None = None

    @property
    def steps(self) -> int:
        return len(self.waits)


@dataclass
class BenchOptions:
    """``--steps`` timed, ``--warmup`` untimed and ``--split-steps`` synchronised steps per
    mode, and the modes in order."""

    steps: int = 20
    warmup: int = 5
    inputs: list[str] = field(default_factory=lambda: ["synthetic", "shards"])
    split_steps: int = 5

    @property
    def total(self) -> int:
        """Steps one mode trains: warm-up, timed, split and the FLOP-counting one."""
        return self.warmup + self.steps + self.split_steps + 1


def bench(configs: dict[str, Any], options: BenchOptions, notes: list[str]) -> dict[str, Any]:
    """Run every mode (``configs``: mode -> its config); the report, less recipe/overrides."""
    from pretrain.dist import init_distributed, pick_device
    from pretrain.engine.base import resolve_precision

    info = init_distributed()
    device = pick_device(info)
    dtype = resolve_precision(next(iter(configs.values())).engine.precision, device)
    peak, peak_note = peak_tflops(device, dtype)
    results = [bench_mode(cfg, mode, options, peak, notes) for mode, cfg in configs.items()]
    return {
        "rank": info.rank,
        "device": device_name(device),
        "precision": DTYPE_NAMES[dtype],
        "torch": torch.__version__,
        "world_size": info.world_size,
        "warmup": options.warmup,
        "results": [asdict(r) for r in results],
        "notes": [*notes, peak_note, *environment_notes(device, info.world_size)],
    }


def mode_config(cfg: Any, mode: str, options: BenchOptions, tmp: Path) -> Any:
    """The recipe's config for one mode: a fresh ``run.dir``, a schedule long enough for every
    step run, no checkpoint / export / TensorBoard, and the mode's ``data.pipeline``; checked
    by the trainer's preflight (``ValueError``)."""
    from pretrain.train import preflight

    total = max(cfg.run.total_steps, options.total)
    pipeline = {"workers": "workers", "device": "device"}.get(mode, cfg.data.pipeline)
    data = replace(cfg.data, pipeline=pipeline)
    out = replace(
        cfg,
        run=replace(cfg.run, dir=str(tmp / mode), total_steps=total, export=False),
        data=data,
        checkpoint=replace(cfg.checkpoint, every=total + 1),
        log=replace(cfg.log, tensorboard=False, sample_keys=False),
    )
    preflight(out, with_data=mode != "synthetic")
    return out


def bench_mode(
    cfg: Any, mode: str, options: BenchOptions, peak: float, notes: list[str]
) -> ModeResult:
    """Build the mode's run, warm up, time ``options.steps`` steps, count one step's FLOPs."""
    from pretrain.train import build_run

    log.info("bench %s: %d warm-up + %d timed steps", mode, options.warmup, options.steps)
    reset_peak_memory()
    run = build_run(cfg, with_data=mode != "synthetic")
    feed = synthetic_feed(run) if mode == "synthetic" else shard_feed(run)
    try:
        for step in range(options.warmup):
            train_one(run, next(feed), step)
        measured = timed_steps(run, feed, options)
        split_steps(run, feed, options, measured)
        flops = count_flops(run, next(feed), options.total - 1)
        measured.peak_memory_gb = peak_memory_gb(run.device)
    finally:
        feed.close()  # stops the loader workers
    pipeline = None if mode == "synthetic" else run.inputs.name
    del run, feed
    free_device_memory()
    if not flops:
        notes.append(
            f"{mode}: FlopCounterMode counted no FLOPs (e.g. compiled code it cannot see into): "
            "flops_per_step, achieved_tflops and mfu are null"
        )
    return summarize(mode, pipeline, cfg.run.global_batch_size, measured, flops, peak)


def synthetic_feed(run: Any) -> Feed:
    """The same random views every step, made once on the device."""
    b = run.cfg.run.global_batch_size // run.info.world_size
    views = [torch.randn(b, *shape, device=run.device) for shape in view_shapes(run)]
    if run.cfg.engine.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    yield from itertools.repeat(views)


def view_shapes(run: Any) -> list[tuple[int, ...]]:
    """Per view ``(3, S, S)``: the sizes of the recipe's views (the data side's view specs)."""
    from pretrain.data.batched_views import view_specs

    return [(3, spec.size, spec.size) for spec in view_specs(run.method.views, run.cfg.data.aug)]


def shard_feed(run: Any) -> Feed:
    """Loader batch → ``run.inputs.views`` (decode + augment on the device pipeline)."""
    batches = iter(run.loader)
    try:
        for batch in batches:
            yield run.inputs.views(batch)
    finally:
        batches.close()


def train_one(run: Any, views: list[torch.Tensor], step: int) -> None:
    """One training step as the trainer's loop takes it (imported here, not at the top, so
    ``--help`` does not load the models)."""
    from pretrain.train import step_once

    step_once(run, views, step)


def timed_steps(run: Any, feed: Feed, options: BenchOptions) -> Measured:
    """The timed steps, unsynchronised as in training: per-step host data waits, wall time."""
    t = Measured()
    synchronize(run.device)
    start = time.perf_counter()
    for step in range(options.warmup, options.warmup + options.steps):
        t0 = time.perf_counter()
        views = next(feed)
        t.waits.append(time.perf_counter() - t0)
        train_one(run, views, step)
    synchronize(run.device)
    t.wall = time.perf_counter() - start
    return t


def split_steps(run: Any, feed: Feed, options: BenchOptions, t: Measured) -> None:
    """The split steps into ``t``: data and compute each timed to the device's completion."""
    first = options.warmup + options.steps
    for step in range(first, first + options.split_steps):
        synchronize(run.device)
        t0 = time.perf_counter()
        views = next(feed)
        synchronize(run.device)
        t1 = time.perf_counter()
        train_one(run, views, step)
        synchronize(run.device)
        t.data.append(t1 - t0)
        t.computes.append(time.perf_counter() - t1)


def count_flops(run: Any, views: list[torch.Tensor], step: int) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise work is not
    counted) on this device, by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_one(run, views, step)
    synchronize(run.device)
    return int(counter.get_total_flops())


def summarize(
    mode: str, pipeline: str | None, global_batch: int, t: Measured, flops: int, peak: float
) -> ModeResult:
    """The mode's :class:`ModeResult` (``flops`` 0: not counted, so FLOP figures are null)."""
    compute = sum(t.computes) / len(t.computes)
    achieved = flops / compute / 1e12 if flops else None
    return ModeResult(
        input=mode,
        pipeline=pipeline,
        steps=t.steps,
        global_batch=global_batch,
        images_per_s=global_batch * t.steps / t.wall,
        step_s=t.wall / t.steps,
        data_wait_s=sum(t.waits) / t.steps,
        data_wait_frac=sum(t.waits) / t.wall,
        split_steps=len(t.computes),
        data_s=sum(t.data) / len(t.data),
        compute_s=compute,
        flops_per_step=flops or None,
        achieved_tflops=achieved,
        peak_tflops=peak,
        mfu=achieved / peak if achieved is not None else None,
        peak_memory_gb=t.peak_memory_gb,
    )


def peak_tflops(device: torch.device, dtype: torch.dtype, rounds: int = 10) -> tuple[float, str]:
    """The best TFLOP/s over ``rounds`` of square matmuls in ``dtype`` (10 of 8192² per round on
    CUDA; one 1024² on the CPU, 512² in half precision, slow there without AMX), and a note."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024 if dtype == torch.float32 else 512
    per_round = 10 if cuda else 1
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(rounds + 1):  # round 0 warms up (kernel selection, clocks)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / per_round)
    note = f"peak_tflops: best of {rounds} rounds of {n}x{n} {DTYPE_NAMES[dtype]} matmuls"
    return 2 * n**3 / best / 1e12, note


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since this mode began; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def environment_notes(device: torch.device, world_size: int) -> list[str]:
    notes = []
    if device.type != "cuda":
        notes.append(
            "peak_memory_gb: the process's peak RSS (resource.getrusage; CPU), not "
            "reset between modes"
        )
    if world_size > 1:
        notes.append(
            f"{world_size} processes: timings are rank 0's; flops_per_step, "
            "achieved_tflops and peak_tflops are per device"
        )
    return notes
