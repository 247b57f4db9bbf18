"""FSDP2 engine against DDP (2 gloo processes, fp32), exact resume, world-size change."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.engine.fsdp import DCP_DIR
from pretrain.metrics import read_metrics, read_sample_keys
from pretrain.train import build_run
from tests.conftest import ENGINE_STEPS
from tests.launch import RECIPES, final_model_state, losses, overrides, run_cli, train_cli

FSDP = ("engine.name=fsdp", "engine.precision=fp32")
# Max |difference| against DDP after 10 steps. ViT methods with AdamW: what FSDP's
# reduce-scatter vs DDP's all-reduce rounding allows (measured: 0 for MoCo v3 and MAE, 5e-7 for
# DINO). SimCLR/ResNet with LARS: the trust ratio's norm is a sum of per-shard squares, which
# rounds differently from one norm; the 1e-7 difference after step 1 grows to ~2e-4 by step 10.
TOLERANCE = {"mocov3": 1e-5, "dino": 1e-5, "mae": 1e-5, "simclr": 1e-3}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


@pytest.fixture(scope="module")
def fsdp_runs(cifar_train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    runs = {}
    for method in TOLERANCE:
        run_dir = tmp_path_factory.mktemp(f"fsdp-{method}")
        train_cli(method, *overrides(cifar_train_shards, run_dir, ENGINE_STEPS, *FSDP))
        runs[method] = run_dir
    return runs


@pytest.mark.parametrize("method", list(TOLERANCE))
def test_fsdp_matches_ddp(method: str, fsdp_runs: dict, ddp_reference) -> None:
    ddp, fsdp = ddp_reference(method), fsdp_runs[method]
    loss_ddp, loss_fsdp = losses(ddp), losses(fsdp)
    assert [s for s, _ in loss_fsdp] == list(range(1, ENGINE_STEPS + 1))
    worst = max(abs(a - b) for (_, a), (_, b) in zip(loss_ddp, loss_fsdp, strict=True))
    assert worst <= TOLERANCE[method], (method, worst)
    if method == "dino":  # clipped at 3.0 every step: the global norm over both ranks' shards
        norms = [[m["grad_norm"] for m in read_metrics(d)] for d in (ddp, fsdp)]
        assert min(norms[0]) > 3.0
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    # Student, teacher and buffers (DINO's center, BN statistics) after 10 steps.
    assert max_abs_diff(final_model_state(ddp), final_model_state(fsdp)) <= TOLERANCE[method]
    # Sharded: one DCP file per rank; the export is the plain consolidated backbone.
    files = sorted(p.name for p in (ckpt.latest_checkpoint(fsdp) / DCP_DIR).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (fsdp / "export" / "backbone.safetensors").is_file()


def test_activation_checkpointing_keeps_the_numbers(
    cifar_train_shards: Path, tmp_path: Path, ddp_reference
) -> None:
    """DINO has drop path (random): recomputation must replay the same randomness."""
    args = [*FSDP, "engine.activation_checkpointing=true"]
    train_cli("dino", *overrides(cifar_train_shards, tmp_path, ENGINE_STEPS, *args))
    ddp = ddp_reference("dino")
    worst = max(abs(a - b) for (_, a), (_, b) in zip(losses(ddp), losses(tmp_path), strict=True))
    assert worst <= TOLERANCE["dino"]
    assert max_abs_diff(final_model_state(ddp), final_model_state(tmp_path)) <= TOLERANCE["dino"]


def test_exact_resume_under_fsdp(cifar_train_shards: Path, tmp_path: Path, fsdp_runs: dict) -> None:
    half = ENGINE_STEPS // 2
    train_cli(
        "dino",
        *overrides(cifar_train_shards, tmp_path, ENGINE_STEPS, *FSDP, f"run.stop_after={half}"),
    )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [half]
    train_cli("dino", *overrides(cifar_train_shards, tmp_path, ENGINE_STEPS, *FSDP))
    assert losses(tmp_path) == losses(fsdp_runs["dino"])
    assert max_abs_diff(final_model_state(tmp_path), final_model_state(fsdp_runs["dino"])) == 0


# World-size change: DINO (teacher, center buffer, AdamW state) with a global batch of 12, which
# 1, 2 and 3 processes divide. 36 steps × 12 = 432 samples: the 320 of epoch 0 and some of epoch
# 1 (with 3 ranks the 8 shards split unevenly, so a rank can start epoch 1 before another ends 0).
CHANGE_STEPS, STOP = 36, 9
CHANGE = (*FSDP, "run.global_batch_size=12", "log.sample_keys=true")


@pytest.fixture(scope="module")
def interrupted_on_two(cifar_train_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ws-two")
    args = [*CHANGE, f"run.stop_after={STOP}"]
    train_cli("dino", *overrides(cifar_train_shards, run_dir, CHANGE_STEPS, *args))
    return run_dir


def test_two_process_checkpoint_loads_exactly_on_one(
    cifar_train_shards: Path, interrupted_on_two: Path
) -> None:
    """Model, teacher, buffers and optimizer state read back by one process equal the saved."""
    path = ckpt.latest_checkpoint(interrupted_on_two)
    saved = ckpt.load_checkpoint(path)[0]
    cfg = load_config(
        RECIPES / "dino.yaml",
        overrides(cifar_train_shards, interrupted_on_two, CHANGE_STEPS, *CHANGE),
    )
    try:
        run = build_run(cfg)  # a private single-rank process group for FSDP2
        assert run.start == STOP and run.info.world_size == 1
        loaded_model = run.engine.full_model_state(run.method)
        assert max_abs_diff(loaded_model, final_model_state(interrupted_on_two)) == 0
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        loaded_optim = get_optimizer_state_dict(run.method.student, run.optimizer, options=full)
        saved_optim = consolidated_dcp(path)["optim"]
        assert loaded_optim["state"].keys() == saved_optim["state"].keys()
        for name, entry in saved_optim["state"].items():
            for key, value in entry.items():
                assert torch.equal(
                    torch.as_tensor(loaded_optim["state"][name][key]), torch.as_tensor(value)
                ), (name, key)
        assert saved["step"] == STOP
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def consolidated_dcp(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / "full.pt"
    dcp_to_torch_save(path / DCP_DIR, out)
    try:
        return torch.load(out, weights_only=True)
    finally:
        out.unlink()


@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_on_another_world_size_sees_each_sample_once(
    cifar_train_shards: Path, interrupted_on_two: Path, tmp_path: Path, nproc: int
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted_on_two, run_dir)
    train_cli("dino", *overrides(cifar_train_shards, run_dir, CHANGE_STEPS, *CHANGE), nproc=nproc)
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, CHANGE_STEPS + 1))
    assert all(torch.isfinite(torch.tensor([v for _, v in losses(run_dir)])))
    keys = read_sample_keys(run_dir)
    assert len(keys) == CHANGE_STEPS * 12
    epoch0 = Counter(index for epoch, index in keys if epoch == 0)
    assert sorted(epoch0) == list(range(320)), "a sample of the interrupted epoch was skipped"
    assert set(epoch0.values()) == {1}, "a sample of the interrupted epoch was seen twice"
    assert (run_dir / "export" / "backbone.safetensors").is_file()


def test_export_only_consolidates_a_sharded_checkpoint(fsdp_runs: dict, tmp_path: Path) -> None:
    """``--export-only`` on an FSDP run (no process group) writes the backbone training exported."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_runs["mocov3"], run_dir)
    trained = load_file(run_dir / "export" / "backbone.safetensors")
    shutil.rmtree(run_dir / "export")
    proc = run_cli(
        str(RECIPES / "mocov3.yaml"), f"run.dir={run_dir}", "engine.name=fsdp", "--export-only"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(run_dir / "export" / "backbone.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_resuming_with_another_engine_is_refused(
    ddp_reference, cifar_train_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(ddp_reference("mocov3"), run_dir)
    args = overrides(cifar_train_shards, run_dir, ENGINE_STEPS + 2, *FSDP)
    proc = run_cli(str(RECIPES / "mocov3.yaml"), *args)
    assert proc.returncode == 2
    assert "saved by the 'ddp' engine; resume it with engine.name=ddp" in proc.stderr
