"""The training loop: build → resume → (batch → step → log → checkpoint)* → export."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain import checkpoint as ckpt
from pretrain.backbones import build_backbone
from pretrain.collapse import collapse_metrics
from pretrain.config import Config, config_to_yaml, to_dict
from pretrain.data.loader import TrainLoader
from pretrain.data.pipeline import InputPipeline
from pretrain.dist import DistInfo, all_reduce_sums, detect_launch, init_distributed, pick_device
from pretrain.engine import Engine, build_engine, check_engine_supports, plain_model_state
from pretrain.export import export_backbone
from pretrain.methods import LossOutput, Method, StepState, build_method
from pretrain.metrics import MetricsLogger, SampleKeyLog, Throughput
from pretrain.optim import apply_schedule, build_optimizer
from pretrain.preemption import StopRequest
from pretrain.schedules import warmup_cosine
from pretrain.step import train_step

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    last_step: int
    finished: bool
    export_dir: Path | None
    stopped_by_signal: bool = False


@dataclass
class Run:
    """Everything the loop touches, built (and resumed) by :func:`build_run`."""

    cfg: Config
    info: DistInfo
    device: torch.device
    method: Method
    engine: Engine
    optimizer: Any  # torch optimizer, or the engine's wrapper of it (DeepSpeed)
    peak_lr: float
    loader: TrainLoader | None  # None: built without data (synthetic benchmarks)
    inputs: InputPipeline  # loader batch -> views on the device
    metrics: MetricsLogger
    start: int

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        final = self.peak_lr * o.final_lr_ratio
        return warmup_cosine(step, self.cfg.run.total_steps, o.warmup_steps, self.peak_lr, final)

    def weight_decay_at(self, step: int) -> float:
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return o.weight_decay
        return warmup_cosine(step, self.cfg.run.total_steps, 0, o.weight_decay, o.weight_decay_end)


def train(cfg: Config) -> RunResult:
    """Train from the newest checkpoint in ``run.dir`` (or from scratch) to ``stop_after``/end."""
    run = build_run(cfg)
    stop = StopRequest(run.device)  # SIGUSR1 / SIGTERM → checkpoint at the next step boundary
    try:
        step = run_steps(run, stop)
    finally:
        stop.restore()
    end = cfg.run.stop_after or cfg.run.total_steps
    return finish(run, step, stopped_by_signal=stop.flag and step < end)


def run_steps(run: Run, stop: StopRequest) -> int:
    """Steps from ``run.start`` to ``stop_after``/the end; returns the last completed step."""
    cfg = run.cfg
    end = cfg.run.stop_after or cfg.run.total_steps
    meter, batches, step = Throughput(), iter(run.loader), run.start
    sample_log = SampleKeyLog(cfg.run.dir, run.info.rank, step) if cfg.log.sample_keys else None
    while step < end:
        t0 = time.perf_counter()
        batch = next(batches)  # waits for the loader workers
        if sample_log is not None:
            sample_log.log(step + 1, batch["epoch"].tolist(), batch["index"].tolist())
        views = run.inputs.views(batch)  # device pipeline: decode + augment here, batched
        meter.add(views[0].shape[0] * run.info.world_size, time.perf_counter() - t0)
        out, logs = step_once(run, views, step)
        step += 1
        if step % cfg.log.every == 0 or step == end:
            if out.embeddings is not None:
                logs.update(collapse_metrics(out.embeddings))
            log_step(run, step, {"loss": out.loss.detach(), **logs}, meter)
        # Collective, and on CUDA a host sync: asked only at log steps (which sync anyway), so a
        # signal is honoured within log.every steps; all ranks decide at the same step.
        stopping = (step % cfg.log.every == 0 or step == end) and stop.agreed()
        if step % cfg.checkpoint.every == 0 or step == end or stopping:
            save(run, step)
        if stopping:
            log.warning(
                "stop signal (%s): checkpoint at step %d saved, exiting",
                stop.signal_name or "another rank",
                step,
            )
            break
    return step


def step_once(
    run: Run, views: list[torch.Tensor], step: int
) -> tuple[LossOutput, dict[str, float]]:
    """Training step ``step`` (0-based) on ``views``: its lr and weight decay, then
    :func:`~pretrain.step.train_step`."""
    apply_schedule(run.optimizer, run.lr_at(step), run.weight_decay_at(step))
    state = StepState(step=step, total_steps=run.cfg.run.total_steps)
    return train_step(run.method, run.engine, run.optimizer, views, state)


def build_run(cfg: Config, with_data: bool = True) -> Run:
    """Everything the loop needs, resumed from ``run.dir``'s newest checkpoint;
    ``with_data=False`` leaves the loader out (``data.train`` is not read)."""
    info = init_distributed()
    device = pick_device(info)
    per_device_batch = check_batch(cfg, info)
    run_dir = Path(cfg.run.dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    engine = build_engine(cfg.engine, device)
    engine.per_device_batch = per_device_batch
    method = engine.wrap(build_method(cfg.method, build_backbone(cfg.backbone)))
    optimizer, peak_lr = build_optimizer(cfg.optim, method.student, cfg.run.global_batch_size)
    optimizer = engine.attach_optimizer(method, optimizer)
    start, loader_state = resume(run_dir, method, optimizer, engine)
    d = cfg.data
    inputs = InputPipeline(
        method.views, d.aug, d.pipeline, device, cfg.engine.channels_last, d.decode
    )
    loader = build_loader(cfg, inputs, info, per_device_batch, loader_state) if with_data else None
    metrics = MetricsLogger(run_dir, start, info.is_main, cfg.log.tensorboard)
    log.info(
        "steps %d → %d of %d, per-device batch %d, %d process(es) on %s, %s data pipeline",
        start,
        cfg.run.stop_after or cfg.run.total_steps,
        cfg.run.total_steps,
        per_device_batch,
        info.world_size,
        device,
        inputs.name,
    )
    return Run(
        cfg, info, device, method, engine, optimizer, peak_lr, loader, inputs, metrics, start
    )


def build_loader(
    cfg: Config, inputs: InputPipeline, info: DistInfo, per_device_batch: int, state: dict | None
) -> TrainLoader:
    """This rank's resumable loader over ``data.train``, producing what ``inputs`` consumes."""
    return TrainLoader(
        cfg.data.train,
        inputs.worker_fn,
        per_device_batch=per_device_batch,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        state=state,
    )


def log_step(run: Run, step: int, logs: dict, meter: Throughput) -> None:
    """Reduce loss (mean) and corrupt-sample counts (sum) over ranks, then record. Syncs."""
    loss_sum, corrupt = all_reduce_sums(
        [float(logs.pop("loss")), run.loader.corrupt_count + run.inputs.corrupt_count], run.device
    )
    values = {
        "loss": loss_sum / run.info.world_size,
        "lr": run.optimizer.param_groups[0]["lr"],
        **logs,
        **meter.report(),
        "corrupt_samples": int(corrupt),
    }
    run.metrics.log(step, values)
    log.info(progress_line(step, run.cfg.run.total_steps, values))


def save(run: Run, step: int) -> None:
    """Collective: the engine writes its shards; the loader state merges every rank's
    consumed samples."""

    def build_state(directory: Path) -> dict:
        state = run.engine.save_state(run.method, run.optimizer, directory)
        return state | {"step": step, "loader": run.loader.state_dict(), "config": to_dict(run.cfg)}

    meta = {"engine": run.engine.name}
    ckpt.save_checkpoint(run.cfg.run.dir, step, build_state, run.cfg.checkpoint.keep, meta)


def finish(run: Run, step: int, stopped_by_signal: bool = False) -> RunResult:
    run.metrics.close()
    finished = step >= run.cfg.run.total_steps
    export_dir = None
    if finished and run.cfg.run.export:
        state = run.engine.full_model_state(run.method)  # collective; None off rank 0
        if state is not None:
            export_dir = export_from_state(run.cfg, state, step)
            log.info("exported backbone to %s", export_dir)
    return RunResult(step, finished, export_dir, stopped_by_signal)


def check_batch(cfg: Config, info: DistInfo) -> int:
    """Per-device batch from the global one; it must divide evenly."""
    if cfg.run.global_batch_size % info.world_size:
        raise ValueError(
            f"run.global_batch_size: {cfg.run.global_batch_size} is not divisible by the "
            f"world size {info.world_size}"
        )
    return cfg.run.global_batch_size // info.world_size


def resume(
    run_dir: Path, method: Method, optimizer: Any, engine: Engine
) -> tuple[int, dict | None]:
    """Load the newest complete checkpoint, if any: returns (step, loader state)."""
    path = check_resumable(run_dir, engine.name)
    if path is None:
        return 0, None
    state, rank_state = ckpt.load_checkpoint(path)
    engine.load_state(method, optimizer, path, state)
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return state["step"], state["loader"]


def check_resumable(run_dir: str | Path, engine_name: str) -> Path | None:
    """The newest checkpoint of ``run_dir`` (``None``: none), refused when another engine wrote
    it (checkpoint layouts differ between engines)."""
    path = ckpt.latest_checkpoint(run_dir)
    if path is not None and (saved_by := ckpt.read_meta(path)["engine"]) != engine_name:
        raise ValueError(
            f"engine.name: {path} was saved by the {saved_by!r} engine; resume it with "
            f"engine.name={saved_by} (or export it and start a new run)"
        )
    return path


def progress_line(step: int, total: int, values: dict) -> str:
    eta = (total - step) * values["step_s"]
    return (
        f"step {step}/{total} loss {values['loss']:.4f} lr {values['lr']:.4g} "
        f"img/s {values['img_per_s']:.1f} data-wait {100 * values['data_wait']:.0f}% "
        f"eta {eta / 60:.1f} min"
    )


def preflight(cfg: Config, with_data: bool = True) -> None:
    """Checks that need the filesystem or the launch, before any work (``ValueError``);
    ``with_data=False``: ``data.train`` is not needed (see :func:`build_run`)."""
    from data_prep.manifest import is_shard_dir

    if with_data and not cfg.data.train:
        raise ValueError("data.train: not set (a shard directory from 'python -m data_prep write')")
    if with_data and not is_shard_dir(cfg.data.train):
        raise ValueError(
            f"data.train: {cfg.data.train} is not a shard directory (no manifest.json)"
        )
    check_batch(cfg, detect_launch())
    check_engine_supports(cfg.engine, cfg.method)
    check_resumable(cfg.run.dir, cfg.engine.name)


def export_only(cfg: Config) -> Path:
    """Export the backbone from the newest checkpoint of ``run.dir`` (no training)."""
    path = ckpt.latest_checkpoint(cfg.run.dir)
    if path is None:
        raise ValueError(f"run.dir: no checkpoint in {cfg.run.dir}/checkpoints")
    state, _ = ckpt.load_checkpoint(path)
    model_state = plain_model_state(path, ckpt.read_meta(path)["engine"], state)
    return export_from_state(cfg, model_state, state["step"])


def export_from_state(cfg: Config, model_state: dict, step: int) -> Path:
    """Rebuild the plain method on the CPU, load ``model_state`` and export its backbone."""
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg.method, build_backbone(cfg.backbone))
    method.load_state_dict(model_state)
    return export_backbone(
        method.export_backbone(), Path(cfg.run.dir) / "export", extra=export_extra(cfg, step)
    )


def export_extra(cfg: Config, step: int) -> dict:
    """What eval needs beside the weights: the input size and normalisation used in training."""
    aug = cfg.data.aug
    return {
        "method": cfg.method.name,
        "step": step,
        "image_size": aug.size,
        "mean": list(aug.mean),
        "std": list(aug.std),
    }
