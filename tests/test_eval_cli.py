"""``python -m eval knn`` end to end on a tiny folder of real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.__main__ import build_parser, main
from eval.results import format_table
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.export import export_backbone
from tests.paths import CIFAR10

REPO = Path(__file__).resolve().parents[1]
CIFAR = CIFAR10
RECORD_KEYS = {
    "checkpoint",
    "sha256",
    "protocol",
    "dataset",
    "metrics",
    "config",
    "seconds",
    "versions",
}
CONFIG_KEYS = {"k", "temperature", "image_size", "max_train", "max_test", "train", "test", "init"}

pytestmark = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"no CIFAR-10 image folder at {CIFAR}")


def copy_subset(split: str, per_class: int, out: Path) -> Path:
    """The first ``per_class`` images of every class of ``CIFAR/split`` as an image folder."""
    for class_dir in sorted(p for p in (CIFAR / split).iterdir() if p.is_dir()):
        (out / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, out / class_dir.name / image.name)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(1)
    backbone = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
    return {
        "train": copy_subset("train", 10, root / "cifar10" / "train"),
        "test": copy_subset("test", 5, root / "cifar10" / "test"),
        "export": export_backbone(backbone, root / "run" / "export"),
        "root": root,
    }


def knn_args(tiny: dict[str, Path], results: Path, *extra: str) -> list[str]:
    return [
        "knn",
        *(
            "--backbone",
            str(tiny["export"]),
            "--train",
            str(tiny["train"]),
            "--test",
            str(tiny["test"]),
        ),
        *("--results", str(results), "--num-workers", "0", "--batch-size", "64", "--device", "cpu"),
        *extra,
    ]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_record(record: dict, tiny: dict[str, Path], init: str, k: int, t: float) -> None:
    assert set(record) == RECORD_KEYS
    assert record["checkpoint"] == str(tiny["export"].resolve())
    assert len(record["sha256"]) == 64 and int(record["sha256"], 16) >= 0
    assert record["protocol"] == f"knn-k{k}-t{t:g}"
    assert record["dataset"] == "cifar10/test"
    assert set(record["metrics"]) == {"top1", "top5"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    assert record["metrics"]["top1"] <= record["metrics"]["top5"]
    assert set(record["config"]) >= CONFIG_KEYS
    assert record["config"]["init"] == init
    assert record["config"]["k"] == k and record["config"]["temperature"] == t
    assert record["seconds"] > 0
    assert set(record["versions"]) == {"torch", "torchvision", "timm", "python"}


def test_cli_knn_with_random_init_baseline(tiny, tmp_path):
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "eval", *knn_args(tiny, results, "--random-init-baseline")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = read_lines(results)
    assert len(records) == 4  # both common settings, trained then random init
    for record, init, (k, t) in zip(
        records, ["trained"] * 2 + ["random"] * 2, [(20, 0.07), (200, 0.1)] * 2, strict=True
    ):
        check_record(record, tiny, init, k, t)
    assert records[0]["config"]["num_train"] == 100 and records[0]["config"]["num_test"] == 50
    assert records[0]["metrics"] != records[2]["metrics"]
    assert "| checkpoint" in proc.stdout and "run/export (random init)" in proc.stdout
    assert "knn-k200-t0.1" in proc.stdout


def test_cli_knn_settings_from_one_extraction_equal_separate_runs(tiny, tmp_path):
    both, alone = tmp_path / "both.jsonl", tmp_path / "alone.jsonl"
    limits = ("--max-train", "60", "--max-test", "30")
    assert main(knn_args(tiny, both, *limits, "--k", "3", "50", "--temperature", "0.05")) == 0
    assert main(knn_args(tiny, alone, *limits, "--k", "50", "--temperature", "0.05")) == 0
    records = read_lines(both)
    assert [r["protocol"] for r in records] == ["knn-k3-t0.05", "knn-k50-t0.05"]
    assert records[1]["metrics"] == read_lines(alone)[0]["metrics"]


def test_cli_knn_mismatched_settings_exit_2(tiny, tmp_path, capsys):
    argv = knn_args(tiny, tmp_path / "r.jsonl", "--k", "1", "2", "3", "--temperature", "0.1", "1")
    assert main(argv) == 2
    assert "--k (3 values) and --temperature (2 values)" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_knn_in_process_appends_one_line(tiny, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text('{"existing": 1}\n')
    weights = tiny["export"] / "backbone.safetensors"  # the weights file works as --backbone too
    argv = knn_args(tiny, results, "--max-train", "30", "--max-test", "12", "--k", "5")
    argv[argv.index("--backbone") + 1] = str(weights)
    assert main(argv) == 0
    lines = read_lines(results)
    assert len(lines) == 2 and lines[0] == {"existing": 1}
    record = lines[1]
    assert record["protocol"] == "knn-k5-t0.07"
    assert record["config"]["num_train"] == 30 and record["config"]["num_test"] == 12
    assert record["config"]["max_train"] == 30 and record["config"]["init"] == "trained"
    assert "knn-k5-t0.07" in capsys.readouterr().out


def test_missing_backbone_exits_2(tiny, tmp_path, capsys):
    argv = knn_args(tiny, tmp_path / "r.jsonl")
    argv[argv.index("--backbone") + 1] = str(tmp_path / "nope")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "nope" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_unlabelled_data_exits_2(tiny, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((tiny["test"] / "cat").iterdir())[:3]:
        shutil.copy(image, flat / image.name)
    argv = knn_args(tiny, tmp_path / "r.jsonl")
    argv[argv.index("--test") + 1] = str(flat)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no labels" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["knn", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backbone", "--train", "--test", "--k", "--temperature", "--batch-size",
                   "--num-workers", "--image-size", "--results", "--max-train", "--max-test",
                   "--random-init-baseline", "--device"):  # fmt: skip
        assert option in out


def test_format_table_is_aligned():
    records = [
        {"checkpoint": "/runs/a/export", "protocol": "knn-k20-t0.07", "seconds": 12.34,
         "metrics": {"top1": 91.5, "top5": 99.75}, "config": {"init": "trained"}},
        {"checkpoint": "/runs/a/export", "protocol": "knn-k20-t0.07", "seconds": 3.0,
         "metrics": {"top1": 9.0, "top5": 50.0}, "config": {"init": "random"}},
    ]  # fmt: skip
    lines = format_table(records).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "checkpoint", "protocol", "top1", "top5", "seconds"
    ]  # fmt: skip
    assert lines[1].startswith("|---") and lines[1].endswith(":|")
    assert "| a/export " in lines[2] and "| 91.50 | 99.75 |" in lines[2]
    assert "| a/export (random init) |" in lines[3] and "|  9.00 | 50.00 |" in lines[3]


def torchrun_eval(*args: str) -> subprocess.CompletedProcess:
    """``python -m eval ARGS`` as 2 gloo processes on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "eval", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_single_process_results_and_share_the_cache(tiny, tmp_path):
    """k-NN (both settings) then the linear probe under torchrun: rank 0 alone writes the
    records; the metrics equal one process's; k-NN extracts and caches the features (rank 0
    writes, both ranks decide together), the probe then hits the cache on every rank."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    probe = ("--epochs", "3", "--warmup-epochs", "1", "--lrs", "0.1", "1.0", "--probe-batch-size",
             "32")  # fmt: skip
    for results, cache in ((one, tmp_path / "c1"), (two, tmp_path / "c2")):
        knn = knn_args(tiny, results, "--cache-dir", str(cache), "--batch-size", "16")
        linear = ["linear", *knn[1:], *probe]
        if results == one:
            assert main(knn) == 0 and main(linear) == 0
        else:
            for argv in (knn, linear):
                proc = torchrun_eval(*argv)
                assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = read_lines(one), read_lines(two)
    assert [r["protocol"] for r in double] == ["knn-k20-t0.07", "knn-k200-t0.1", "linear"]
    for a, b in zip(single, double, strict=True):
        assert a["metrics"] == b["metrics"] and a["config"]["num_train"] == b["config"]["num_train"]
    assert double[0]["config"]["feature_cache"]["hits"] == 0
    assert double[2]["config"]["feature_cache"]["hit"] is True
    assert len(list((tmp_path / "c2").glob("*.pt"))) == 2
