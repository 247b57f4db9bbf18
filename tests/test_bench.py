"""``python -m pretrain.bench`` on the CPU: every report field for every input mode with sane
values, one step's FLOPs against an independent count, and the CLI's help and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pretrain" / "recipes" / "debug"
TOP_KEYS = {"recipe", "overrides", "device", "precision", "torch", "results", "notes"}
MODE_KEYS = {
    "input",
    "pipeline",
    "steps",
    "global_batch",
    "images_per_s",
    "step_s",
    "data_wait_s",
    "data_wait_frac",
    "split_steps",
    "data_s",
    "compute_s",
    "flops_per_step",
    "achieved_tflops",
    "peak_tflops",
    "mfu",
    "peak_memory_gb",
}


def bench_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pretrain.bench ARGS`` in a fresh process (one thread: on a shared 2-core
    machine, two spinning OpenMP threads made a run 3× slower)."""
    cmd = [sys.executable, "-m", "pretrain.bench", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_bench(recipe: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """The JSON report and stdout of a bench run that must succeed."""
    out = tmp_path / "bench.json"
    proc = bench_cli(str(RECIPES / f"{recipe}.yaml"), *args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def recipe_yaml(recipe: str) -> dict:
    return yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())


def test_every_field_of_every_mode(cifar_train_shards: Path, tmp_path: Path) -> None:
    user_run = tmp_path / "user-run"
    report, stdout = run_bench(
        "simclr",
        tmp_path,
        f"data.train={cifar_train_shards}",
        f"run.dir={user_run}",
        "data.num_workers=0",
        "--inputs",
        "synthetic,workers,device",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--split-steps",
        "2",
    )
    assert report.keys() >= TOP_KEYS and report["precision"] == "fp32"
    assert report["device"].startswith("cpu") and any("RSS" in n for n in report["notes"])
    results = report["results"]
    assert [(r["input"], r["pipeline"]) for r in results] == [
        ("synthetic", None),
        ("workers", "workers"),
        ("device", "device"),
    ]
    batch = recipe_yaml("simclr")["run"]["global_batch_size"]
    for r in results:
        assert r.keys() == MODE_KEYS
        assert r["steps"] == 2 and r["split_steps"] == 2 and r["global_batch"] == batch
        assert r["images_per_s"] == pytest.approx(batch / r["step_s"])
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
        assert r["data_wait_s"] == pytest.approx(r["data_wait_frac"] * r["step_s"])
        assert 0 < r["data_wait_s"] < r["step_s"] and 0 < r["data_s"] < r["step_s"]
        # on the CPU a synchronisation waits for nothing: the split steps add up to a step
        assert r["data_s"] + r["compute_s"] == pytest.approx(r["step_s"], rel=0.35)
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_step"] / r["compute_s"] / 1e12)
        assert r["peak_tflops"] > 0 and r["mfu"] > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops"])
        assert r["peak_memory_gb"] > 0
    flops = {r["flops_per_step"] for r in results}
    assert len(flops) == 1 and flops.pop() > 0  # same shapes in every mode
    assert all(mode in stdout for mode in ("synthetic", "workers (workers)", "device (device)"))
    assert not user_run.exists()  # the bench trains in temporary run directories only


def direct_flops(recipe: str) -> int:
    """FLOPs of the method's forward + backward on the views the recipe declares (2 globals of
    ``aug.size``, ``aug.local_crops`` locals of ``aug.local_size``), read from the YAML here."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.backbones import build_backbone
    from pretrain.config import load_config
    from pretrain.methods import StepState, build_method

    raw = recipe_yaml(recipe)
    b, aug = raw["run"]["global_batch_size"], raw["data"]["aug"]
    shapes = [aug["size"]] * len(aug["blur_prob"]) + [aug["local_size"]] * aug["local_crops"]
    views = [torch.randn(b, 3, s, s) for s in shapes]
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    torch.manual_seed(0)
    method = build_method(cfg.method, build_backbone(cfg.backbone))
    with FlopCounterMode(display=False) as counter:
        method(views, StepState(step=0, total_steps=cfg.run.total_steps)).loss.backward()
    return counter.get_total_flops()


def test_multi_crop_flops_match_a_direct_count(tmp_path: Path) -> None:
    """DINO's 2 + 2 crops; no data.train at all (synthetic needs no shards)."""
    report, _ = run_bench(
        "dino",
        tmp_path,
        "--inputs",
        "synthetic",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--split-steps",
        "1",
    )
    (result,) = report["results"]
    assert result["input"] == "synthetic" and result["pipeline"] is None
    assert result["flops_per_step"] == direct_flops("dino")


def test_help_names_every_option_and_mode(capsys: pytest.CaptureFixture) -> None:
    from pretrain.bench.__main__ import INPUTS, parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--steps", "--warmup", "--split-steps", "--inputs", "--json", "overrides",
                 *INPUTS):  # fmt: skip
        assert word in text, word


@pytest.mark.parametrize(
    ("args", "needle"),
    [(("run.sed=1",), "run.sed"), (("--inputs", "workers"), "data.train")],
)
def test_config_errors_exit_2_with_one_line(
    args: tuple[str, ...], needle: str, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """In-process (the CLI's exit status is ``main``'s return value); the logging set-up is
    left out so pytest's log capture stays as it is."""
    from pretrain.bench import __main__ as bench

    monkeypatch.setattr(bench, "setup_logging", lambda: None)
    assert bench.main([str(RECIPES / "simclr.yaml"), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and not captured.out, captured.err
