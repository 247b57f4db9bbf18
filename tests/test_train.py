"""End-to-end pretraining on real CIFAR-10 shards: exact resume, checkpoints, export, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import load_config
from pretrain.export import load_exported_backbone
from pretrain.metrics import read_metrics
from pretrain.train import train
from tests.launch import run_cli, train_cli

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pretrain" / "recipes" / "debug"
STEPS = 6


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train={shards}",
        f"run.dir={run_dir}",
        f"run.total_steps={STEPS}",
        "checkpoint.every=100",
        *extra,
    ]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


@pytest.mark.parametrize(("method", "workers"), [("simclr", 0), ("simclr", 2), ("mocov3", 0)])
def test_exact_resume_single_process(
    cifar_train_shards: Path, tmp_path: Path, method: str, workers: int
) -> None:
    recipe = RECIPES / f"{method}.yaml"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = [f"data.num_workers={workers}"]
    train(load_config(recipe, overrides(cifar_train_shards, straight, *extra)))
    first = train(
        load_config(
            recipe, overrides(cifar_train_shards, resumed, *extra, f"run.stop_after={STEPS // 2}")
        )
    )
    assert first.last_step == STEPS // 2 and not first.finished
    assert [s for s, _ in ckpt.list_checkpoints(resumed)] == [STEPS // 2]
    second = train(load_config(recipe, overrides(cifar_train_shards, resumed, *extra)))
    assert second.finished and second.export_dir is not None
    assert losses(straight) == losses(resumed)
    assert [s for s, _ in losses(resumed)] == list(range(1, STEPS + 1))
    state_a = torch.load(ckpt.latest_checkpoint(straight) / "state.pt", weights_only=True)
    state_b = torch.load(ckpt.latest_checkpoint(resumed) / "state.pt", weights_only=True)
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key


@pytest.mark.parametrize("method", ["simclr", "mocov3", "swav"])  # SwAV: its queue full at 3
def test_exact_resume_two_processes(cifar_train_shards: Path, tmp_path: Path, method: str) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir, extra in [
        (straight, []),
        (resumed, [f"run.stop_after={STEPS // 2}"]),
        (resumed, []),
    ]:
        train_cli(method, *overrides(cifar_train_shards, run_dir, *extra))
    assert losses(straight) == losses(resumed)
    assert len(losses(straight)) == STEPS
    meta = (ckpt.latest_checkpoint(resumed) / "meta.json").read_text()
    assert '"world_size": 2' in meta
    assert (ckpt.latest_checkpoint(resumed) / "rank-1.pt").is_file()


def test_checkpoint_retention_and_incomplete_dirs(cifar_train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(
        RECIPES / "simclr.yaml",
        overrides(cifar_train_shards, run_dir, "checkpoint.every=1", "checkpoint.keep=2"),
    )
    train(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [STEPS - 1, STEPS]
    # A half-written checkpoint (crash before the rename) is never picked for resume.
    (run_dir / "checkpoints" / f".step-{STEPS + 1}.tmp").mkdir()
    (run_dir / "checkpoints" / f"step-{STEPS + 2}").mkdir()  # no meta.json / state.pt
    assert ckpt.latest_checkpoint(run_dir).name == f"step-{STEPS}"
    state = torch.load(ckpt.latest_checkpoint(run_dir) / "state.pt", weights_only=True)
    assert {"model", "optimizer", "engine", "loader", "config", "step"} <= state.keys()
    assert state["config"]["run"]["dir"] == str(run_dir)


def test_export_matches_trained_backbone(cifar_train_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = train(load_config(RECIPES / "mocov3.yaml", overrides(cifar_train_shards, run_dir)))
    backbone = load_exported_backbone(result.export_dir).eval()
    state = torch.load(ckpt.latest_checkpoint(run_dir) / "state.pt", weights_only=True)["model"]
    teacher = {
        k.removeprefix("teacher.backbone."): v
        for k, v in state.items()
        if k.startswith("teacher.backbone.")
    }
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, teacher[key]), key  # MoCo v3 exports the momentum encoder


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("run.sed=1", "run.sed"),
        ("optim.base_lr=fast", "optim.base_lr"),
        ("method.name=nope", "method.name"),
        ("run.stop_after=999", "run.stop_after"),
        ("backbone.name=resnet7", "backbone.name"),
    ],
)
def test_config_errors_exit_nonzero_naming_the_key(override: str, needle: str) -> None:
    proc = run_cli(str(RECIPES / "simclr.yaml"), override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_missing_shards_fail_before_work(tmp_path: Path) -> None:
    proc = run_cli(str(RECIPES / "simclr.yaml"), f"data.train={tmp_path}", f"run.dir={tmp_path}/r")
    assert proc.returncode == 2 and "data.train" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_print_config_resolves_overrides() -> None:
    proc = run_cli(str(RECIPES / "mocov3.yaml"), "--print-config", "optim.base_lr=0.5")
    assert proc.returncode == 0
    cfg = __import__("yaml").safe_load(proc.stdout)
    assert cfg["optim"]["base_lr"] == 0.5 and cfg["method"]["name"] == "mocov3"
    assert cfg["method"]["momentum"] == 0.99


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_leaves_the_global_rng_alone(cifar_train_shards: Path, workers: int) -> None:
    """The trainer restores RNG states on resume; the loader must not draw from them."""
    from pretrain.data.loader import TrainLoader
    from pretrain.data.views import AugConfig, ViewMaker

    loader = TrainLoader(
        cifar_train_shards,
        ViewMaker.two_view(AugConfig(size=16)),
        4,
        workers,
        seed=0,
        rank=0,
        world_size=1,
    )
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches = iter(loader)
    next(batches)
    assert torch.equal(torch.rand(3), expected)
