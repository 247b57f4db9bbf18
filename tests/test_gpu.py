"""CUDA paths: bf16 autocast and fp16 grad scaling in real training runs (skipped without CUDA)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.metrics import read_metrics
from pretrain.train import train

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "precision"), [("simclr", "bf16"), ("simclr", "fp16"), ("mocov3", "bf16")]
)
def test_cuda_training_is_finite(
    cifar_train_shards: Path, tmp_path: Path, method: str, precision: str
) -> None:
    cfg = load_config(
        RECIPES / f"{method}.yaml",
        [
            f"data.train={cifar_train_shards}",
            f"run.dir={tmp_path}",
            "run.total_steps=8",
            f"engine.precision={precision}",
            "data.num_workers=2",
        ],
    )
    result = train(cfg)
    assert result.finished and result.export_dir is not None
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)


def gpu_run(method: str, shards: Path, run_dir: Path, *extra: str) -> list[float]:
    """A torchrun run on one GPU (NCCL); returns its per-step losses."""
    from tests.launch import losses, overrides, train_cli

    train_cli(method, *overrides(shards, run_dir, 8, *extra), nproc=1)
    return [v for _, v in losses(run_dir)]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mocov3", "dino", "mae"])
def test_fsdp_bf16_on_nccl_follows_ddp(
    cifar_train_shards: Path, tmp_path: Path, method: str
) -> None:
    """bf16 parameters under FSDP2 (fp32 reductions) against bf16 autocast under DDP."""
    ddp = gpu_run(method, cifar_train_shards, tmp_path / "ddp", "engine.precision=bf16")
    fsdp = gpu_run(
        method, cifar_train_shards, tmp_path / "fsdp", "engine.name=fsdp", "engine.precision=bf16"
    )
    assert all(math.isfinite(v) for v in fsdp)
    assert max(abs(a - b) / abs(a) for a, b in zip(ddp, fsdp, strict=True)) < 0.05


@pytest.mark.gpu
def test_fsdp_compile_and_checkpointing_keep_the_losses(
    cifar_train_shards: Path, tmp_path: Path
) -> None:
    base = ("engine.name=fsdp", "engine.precision=fp32")
    eager = gpu_run("mocov3", cifar_train_shards, tmp_path / "eager", *base)
    compiled = gpu_run(
        "mocov3",
        cifar_train_shards,
        tmp_path / "compiled",
        *base,
        "engine.compile=true",
        "engine.activation_checkpointing=true",
    )
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, compiled, strict=True)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_on_nccl_follows_ddp(
    cifar_train_shards: Path, tmp_path: Path, stage: int
) -> None:
    """ZeRO with DeepSpeed's torch_autocast bf16 against DDP's bf16 autocast (MoCo v3, ViT)."""
    ddp = gpu_run("mocov3", cifar_train_shards, tmp_path / "ddp", "engine.precision=bf16")
    zero = gpu_run(
        "mocov3",
        cifar_train_shards,
        tmp_path / "zero",
        "engine.name=deepspeed",
        f"engine.zero_stage={stage}",
        "engine.precision=bf16",
    )
    assert all(math.isfinite(v) for v in zero)
    assert max(abs(a - b) / abs(a) for a, b in zip(ddp, zero, strict=True)) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("method", "decode"),
    [("simclr", "device"), ("dino", "device"), ("mae", "device"), ("simclr", "workers")],
)
def test_cuda_device_pipeline_trains_and_resumes_exactly(
    cifar_train_shards: Path, tmp_path: Path, method: str, decode: str
) -> None:
    """GPU decode (or worker decode) + batched augmentation in real runs: finite losses, and a
    resume that reproduces the uninterrupted run (views are a function of the per-sample
    seed)."""

    def run(run_dir: Path, *extra: str):
        cfg = load_config(RECIPES / f"{method}.yaml", [
            f"data.train={cifar_train_shards}", f"run.dir={run_dir}", "run.total_steps=6",
            "data.pipeline=device", f"data.decode={decode}", "data.num_workers=2",
            "checkpoint.every=100", *extra,
        ])  # fmt: skip
        return train(cfg)

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "run.stop_after=3")
    assert run(tmp_path / "resumed").finished
    straight = [m["loss"] for m in read_metrics(tmp_path / "straight")]
    resumed = [m["loss"] for m in read_metrics(tmp_path / "resumed")]
    assert len(straight) == 6 and all(math.isfinite(v) for v in straight)
    assert straight == pytest.approx(resumed, rel=1e-3)  # bf16 + cuDNN algorithms: not bit-exact


@pytest.mark.gpu
def test_cuda_bench_reports_every_mode(cifar_train_shards: Path, tmp_path: Path) -> None:
    import json

    from pretrain.bench.__main__ import main as bench_main

    out = tmp_path / "bench.json"
    argv = [str(RECIPES / "simclr.yaml"), f"data.train={cifar_train_shards}",
            "--inputs", "synthetic,workers,device", "--steps", "3", "--warmup", "2",
            "--json", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and [r["input"] for r in report["results"]] == [
        "synthetic", "workers", "device"
    ]  # fmt: skip
    for r in report["results"]:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_gb"] > 0
