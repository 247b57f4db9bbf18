"""``python -m eval batch``: checkpoints x protocols, each pair once, resumable, tables; and its
expansion into a job array by ``slurm/submit.py``."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval.batch as batch
from eval.__main__ import main as eval_main
from eval.results import dataset_name, read_results
from eval.tables import COLUMNS
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.export import export_backbone
from tests.paths import RACCOON

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny ResNet-18 (CIFAR stem) exports from different seeds, ``runs/{a,b}/export``."""
    root = tmp_path_factory.mktemp("batch_runs")
    out = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        backbone = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
        out.append(export_backbone(backbone, root / name / "export"))
    return out


def batch_argv(
    sources: list[str], results: Path, shards: Path, cache: Path, protocols: str = "knn,linear"
) -> list[str]:
    return [
        "batch",
        *("--checkpoints", *sources),
        *("--protocols", protocols, "--results", str(results)),
        *("--train", str(shards), "--test", str(shards)),
        *("--max-train", "40", "--max-test", "20", "--batch-size", "40"),
        *("--num-workers", "0", "--device", "cpu", "--k", "5"),
        *("--epochs", "1", "--warmup-epochs", "0", "--lrs", "0.1", "--cache-dir", str(cache)),
    ]


def pairs_of(results: Path) -> list[tuple[str, str]]:
    return [(r["checkpoint"], r["protocol"]) for r in read_results(results)]


def test_each_pair_once_resumes_and_writes_tables(
    exports: list[Path], cifar_train_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    results = tmp_path / "results.jsonl"
    argv = batch_argv(
        [str(exports[0].parent.parent)], results, cifar_train_shards, tmp_path / "cache"
    )
    # a batch killed during its second evaluation: only the first result is written
    calls: list[list[str]] = []
    real = batch.run_pair

    def dies_second(pair_argv: list[str]) -> int:
        calls.append(pair_argv)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(pair_argv)

    monkeypatch.setattr(batch, "run_pair", dies_second)
    with pytest.raises(KeyboardInterrupt):
        eval_main(argv)
    assert pairs_of(results) == [(str(exports[0].resolve()), "knn-k5-t0.07")]

    # the rerun evaluates only the three missing pairs, in checkpoint-major order
    calls.clear()
    monkeypatch.setattr(batch, "run_pair", lambda a: calls.append(a) or real(a))
    assert eval_main(argv) == 0
    runs = exports[0].parent.parent  # children a/ and b/: run directories with an export/
    assert [(c[0], c[2]) for c in calls] == [
        ("linear", str(runs / "a")),
        ("knn", str(runs / "b")),
        ("linear", str(runs / "b")),
    ]
    expected = [(str(e.resolve()), p) for e in exports for p in ("knn-k5-t0.07", "linear")]
    assert sorted(pairs_of(results)) == sorted(expected)  # each pair exactly once

    # tables: one row per record, val_top1 only for linear
    printed = capsys.readouterr().out
    md = results.with_suffix(".md").read_text()
    assert md.strip() in printed
    header = [c.strip() for c in md.splitlines()[0].split("|")[1:-1]]
    assert header == [c for c in COLUMNS if c not in ("AP", "AP50")]  # no detection here
    assert len(md.splitlines()) == 2 + 4
    with open(results.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint_path"], r["protocol"]) for r in rows] == expected
    assert [bool(r["val_top1"]) for r in rows] == [False, True, False, True]
    assert all(r["dataset"] == rows[0]["dataset"] and r["top1"] for r in rows)

    # everything done: nothing evaluated, the table is rendered again
    calls.clear()
    md_path, csv_path = tmp_path / "t" / "x.md", tmp_path / "t" / "x.csv"
    assert eval_main([*argv, "--table-md", str(md_path), "--table-csv", str(csv_path)]) == 0
    assert calls == [] and len(read_results(results)) == 4
    assert md_path.read_text() == md and csv_path.is_file()


def test_checkpoint_sources(exports: list[Path], tmp_path: Path, monkeypatch) -> None:
    runs = exports[0].parent.parent
    (runs / "notes.md").write_text("not a checkpoint\n")  # skipped child of a directory
    (runs / "empty").mkdir(exist_ok=True)  # likewise
    want = [str(e) for e in exports]
    assert batch.expand_checkpoints([str(runs)]) == [str(runs / "a"), str(runs / "b")]
    assert batch.expand_checkpoints([str(runs / "*" / "export")]) == want
    listing = tmp_path / "ckpts.txt"
    listing.write_text(f"# ours\n{exports[1]}\n\n{exports[0]}\n{exports[1]}/backbone.safetensors\n")
    assert batch.expand_checkpoints([str(listing)]) == [want[1], want[0]]  # one per location
    assert batch.expand_checkpoints([str(exports[0]), str(runs / "b")]) == [
        want[0],
        str(runs / "b"),
    ]
    (tmp_path / "nothing").mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# none\n")
    for sources in ([str(tmp_path / "nothing")], [str(tmp_path / "no*match")], [str(empty)]):
        with pytest.raises(batch.EvalInputError, match="no checkpoints found"):
            batch.expand_checkpoints(sources)
    with pytest.raises(batch.EvalInputError, match="no such file"):
        batch.expand_checkpoints([str(tmp_path / "missing")])


def test_errors_and_dry_run(
    exports: list[Path], cifar_train_shards: Path, tmp_path: Path, capsys
) -> None:
    results = tmp_path / "r.jsonl"
    argv = batch_argv([str(exports[0])], results, cifar_train_shards, tmp_path / "c")
    assert eval_main([*argv[:1], "--checkpoints", str(tmp_path / "none"), *argv[3:]]) == 2
    assert "no such file" in capsys.readouterr().err
    assert eval_main([*argv, "--bogus", "1"]) == 2
    assert "--bogus: not an option of knn, linear" in capsys.readouterr().err
    assert eval_main([*argv[:4], "knn,nope", *argv[5:]]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert eval_main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["run", "run"]
    assert "--epochs" not in out[0] and "--k 5" not in out[1]  # each protocol its own options
    assert not results.exists()


def test_submit_dry_run_one_command_per_missing_pair(
    exports: list[Path], cifar_train_shards: Path, tmp_path: Path
) -> None:
    results = tmp_path / "r.jsonl"
    argv = batch_argv([str(e) for e in exports], results, cifar_train_shards, tmp_path / "c")
    # pretend the first checkpoint's knn is done: copy a real record with its sha256
    from eval.load import weights_sha256
    from eval.results import append_result

    record = {
        "checkpoint": str(exports[0].resolve()),
        "sha256": weights_sha256(exports[0]),
        "protocol": "knn-k5-t0.07",
        "dataset": dataset_name(cifar_train_shards),
        "metrics": {"top1": 10.0, "top5": 50.0},
        "config": {"init": "trained"},
        "seconds": 1.0,
        "versions": {},
    }
    append_result(results, record)
    submit = [sys.executable, str(REPO / "slurm" / "submit.py")]
    profile = str(REPO / "slurm" / "profiles" / "local.yaml")
    proc = subprocess.run(
        [*submit, "--profile", profile, "--dry-run", "--", "eval", *argv],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    commands = [ln for ln in proc.stdout.splitlines() if ln.startswith("# command:")]
    assert [c.split()[5] + " " + c.split()[7] for c in commands] == [
        f"linear {exports[0]}",
        f"knn {exports[1]}",
        f"linear {exports[1]}",
    ]
    assert "#SBATCH --array=0-2" in proc.stdout  # 3 tasks


@pytest.mark.skipif(not RACCOON.is_dir(), reason=f"raccoon set not at {RACCOON}")
def test_knn_both_settings_and_detect_in_one_batch(
    exports: list[Path], cifar_train_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    """Default k-NN writes two records (one pair); detection takes its COCO data through
    ``--detect.OPTION`` beside the classification data; a pair missing one k-NN record reruns."""
    results = tmp_path / "r.jsonl"
    argv = [
        "batch", "--checkpoints", str(exports[0]), "--protocols", "knn,detect",
        "--results", str(results), "--device", "cpu", "--num-workers", "0",
        "--train", str(cifar_train_shards), "--test", str(cifar_train_shards),
        "--max-train", "40", "--max-test", "20", "--batch-size", "20",
        "--detect.train", str(RACCOON / "instances_train.json"),
        "--detect.test", str(RACCOON / "instances_val.json"), "--detect.max-train", "4",
        "--max-val", "2", "--iters", "2", "--warmup-iters", "1", "--detect.batch-size", "2",
        "--min-size", "96", "--max-size", "128",
    ]  # fmt: skip
    pairs = batch.plan(*batch.parse_args(argv[1:]))
    assert [(p.protocol, p.record_protocols, p.dataset) for p in pairs] == [
        ("knn", ("knn-k20-t0.07", "knn-k200-t0.1"), dataset_name(cifar_train_shards)),
        ("detect", ("detect",), "raccoon/instances_val.json"),
    ]
    knn_argv, detect_argv = (p.argv for p in pairs)
    assert detect_argv[detect_argv.index("--train") + 1].endswith("instances_train.json")
    assert "--train" not in detect_argv[detect_argv.index("--train") + 1 :]  # scoped one wins
    assert "--iters" not in knn_argv and knn_argv[knn_argv.index("--batch-size") + 1] == "20"
    assert detect_argv[detect_argv.index("--max-train") + 1] == "4"

    assert eval_main(argv) == 0
    records = read_results(results)
    assert [r["protocol"] for r in records] == ["knn-k20-t0.07", "knn-k200-t0.1", "detect"]
    assert set(records[2]["metrics"]) == {"AP", "AP50", "AP75"}
    md = results.with_suffix(".md").read_text().splitlines()
    assert [c.strip() for c in md[0].split("|")[1:-1]] == [c for c in COLUMNS if c != "val_top1"]
    assert len(md) == 2 + 3

    # a results file that lacks the 200-NN record: the knn pair is not done, detect is
    kept = [line for line in results.read_text().splitlines() if "knn-k200" not in line]
    results.write_text("\n".join(kept) + "\n")
    calls: list[list[str]] = []
    monkeypatch.setattr(batch, "run_pair", lambda a: calls.append(a) or 0)
    assert eval_main(argv) == 0
    assert [c[0] for c in calls] == ["knn"]
