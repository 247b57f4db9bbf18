"""Semi-supervised evaluation: fine-tune or linear-probe on a fixed 1 % / 10 % label subset.

**Subsets.** The pool is the train set (its first ``--max-train`` samples when given), indexed
by global sample index like every eval protocol. ``balance="class"`` (default) takes
``max(1, round(fraction * n_c))`` samples of each class ``c`` (a seeded permutation per class);
``balance="uniform"`` takes ``max(1, round(fraction * N))`` samples of the whole pool, ignoring
labels. The sorted indices are saved as JSON (``indices`` plus the settings that made them:
data, pool size, fraction, balance, seed) to ``--subset-file`` or, by default, to
``<subset dir>/semisup-<data>-<balance>-f<fraction>-seed<seed>-n<pool>.json`` with the subset
dir defaulting to the directory of ``--results``.

**Reuse.** An existing subset file is always read, never rewritten, so every checkpoint is
evaluated on the same images. Its data path, pool size, fraction and balance must match the
request (otherwise the run stops with a message naming the mismatch); its **seed wins**: a run
asking for another seed with the same file uses the file's subset and logs a warning (the
record's config carries the file's ``subset_seed`` and the file's sha256).

**Modes.** ``finetune`` (default): :mod:`eval.finetune` on the subset. ``linear``: the linear
probe of :mod:`eval.linear` on the subset rows of the cached train-pool features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from eval.features import cached_train_test_features
from eval.finetune import add_finetune_args, check_single_process, num_samples, run_finetune_eval
from eval.finetune_data import dataset_labels
from eval.linear import (
    DEFAULT_LRS,
    OPTIMIZERS,
    ProbeConfig,
    add_cache_args,
    cache_of,
    linear_probe,
    probe_config_dict,
)
from eval.load import EvalInputError
from pretrain.backbones import Backbone

log = logging.getLogger(__name__)

BALANCES = ("class", "uniform")
MODES = ("finetune", "linear")
SUBSET_VERSION = 1


def make_subset(
    labels: torch.Tensor, fraction: float, balance: str = "class", seed: int = 0
) -> list[int]:
    """Sorted indices of a seeded ``fraction`` of ``range(len(labels))`` (see module doc)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    if balance == "uniform":
        take = max(1, round(fraction * n))
        return sorted(torch.randperm(n, generator=gen)[:take].tolist())
    if balance != "class":
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if (labels < 0).any():
        raise EvalInputError("class-balanced subsets need every pool sample labelled")
    chosen: list[int] = []
    for c in torch.unique(labels).tolist():  # ascending classes: a fixed draw order
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(fraction * members.numel()))
        chosen += members[torch.randperm(members.numel(), generator=gen)[:take]].tolist()
    return sorted(chosen)


def default_subset_path(
    directory: str | os.PathLike, train: str, balance: str, fraction: float, seed: int, pool: int
) -> Path:
    tag = Path(train).resolve()
    name = f"{tag.parent.name}-{tag.name}".replace(os.sep, "_")
    return Path(directory) / f"semisup-{name}-{balance}-f{fraction:g}-seed{seed}-n{pool}.json"


def load_or_make_subset(
    path: str | os.PathLike, train: str, pool: int, fraction: float, balance: str, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """The subset stored at ``path`` (checked against the request; its seed wins), or a new one
    written there atomically. Returns ``(indices, info)`` with the file's settings and sha256."""
    path = Path(path)
    want = {"data": str(Path(train).resolve()), "pool": pool, "fraction": fraction,
            "balance": balance}  # fmt: skip
    if path.is_file():
        stored = json.loads(path.read_text())
        for key, value in want.items():
            if stored.get(key) != value:
                raise EvalInputError(
                    f"subset file {path} was made with {key}={stored.get(key)!r}, this run asks "
                    f"for {value!r}; pass another --subset-file or delete it"
                )
        if stored["seed"] != seed:
            log.warning("subset file %s has seed %d (asked %d): using the file's subset",
                        path, stored["seed"], seed)  # fmt: skip
        reused = True
    else:
        labels = dataset_labels(train)[:pool] if balance == "class" else torch.zeros(pool)
        indices = make_subset(labels, fraction, balance, seed)
        stored = {"version": SUBSET_VERSION, **want, "seed": seed, "indices": indices}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored) + "\n")
        os.replace(tmp, path)
        reused = False
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = {"subset_file": str(path.resolve()), "subset_sha256": digest, "subset_reused": reused,
            "subset_seed": stored["seed"], "subset_size": len(stored["indices"])}  # fmt: skip
    return [int(i) for i in stored["indices"]], info


def add_semisup_args(p: argparse.ArgumentParser) -> None:
    """Subset, mode, fine-tuning and linear-probe options of ``python -m eval semisup``."""
    add = p.add_argument
    # fmt: off
    add("--fraction", type=float, required=True, metavar="F",
        help="labelled fraction of the train pool, e.g. 0.01 or 0.1")
    add("--balance", choices=BALANCES, default="class",
        help="class: round(F * n_c) per class (>= 1); uniform: round(F * N) of the pool "
        "(default: class)")
    add("--mode", choices=MODES, default="finetune",
        help="fine-tune the whole network, or a linear probe on frozen features "
        "(default: finetune)")
    add("--subset-file", default=None, metavar="PATH",
        help="subset index file: read when it exists (its seed wins), else written "
        "(default: a name made of data, balance, fraction, seed, pool in --subset-dir)")
    add("--subset-dir", default=None, metavar="DIR",
        help="where default-named subset files live (default: the --results directory)")
    add_finetune_args(p, mode_defaults=True)
    lrs = " ".join(f"{lr:g}" for lr in DEFAULT_LRS)
    add("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), metavar="LR",
        help=f"linear mode: learning-rate grid (default: {lrs})")
    add("--probe-batch-size", type=int, default=1024, metavar="N",
        help="linear mode: feature rows per probe step (default: 1024)")
    add("--optimizer", choices=OPTIMIZERS, default="sgd", help="linear mode (default: sgd)")
    add("--momentum", type=float, default=0.9, help="linear mode (default: 0.9)")
    add("--val-fraction", type=float, default=0.1, metavar="F",
        help="linear mode: held-out share of the subset to pick the lr (default: 0.1)")
    # fmt: on
    add_cache_args(p, scope="linear mode: ")


def _subset(args: argparse.Namespace) -> tuple[list[int], dict[str, Any]]:
    n = num_samples(args.train)
    pool = n if args.max_train is None else min(n, args.max_train)
    path = args.subset_file or default_subset_path(
        args.subset_dir or Path(args.results).resolve().parent,
        args.train, args.balance, args.fraction, args.seed, pool,
    )  # fmt: skip
    return load_or_make_subset(path, args.train, pool, args.fraction, args.balance, args.seed)


def _linear(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str,
    indices: list[int],
) -> tuple[dict, dict]:  # fmt: skip
    """Linear probe on the subset rows of the (cached) train-pool features."""
    cache = cache_of(args)
    (train_x, train_y, train_i), (test_x, test_y, _) = cached_train_test_features(
        backbone, args, device, init, cache
    )
    rows = torch.isin(train_i, torch.tensor(indices, dtype=train_i.dtype, device=train_i.device))
    if int(rows.sum()) < 3:
        raise EvalInputError("a linear probe needs at least 3 subset samples")
    cfg = ProbeConfig(
        lrs=tuple(args.lrs), epochs=90 if args.epochs is None else args.epochs,
        warmup_epochs=10.0 if args.warmup_epochs is None else args.warmup_epochs,
        batch_size=args.probe_batch_size, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=0.0 if args.weight_decay is None else args.weight_decay, seed=args.seed,
    )  # fmt: skip
    classes = int(max(train_y.max(), test_y.max())) + 1
    result = linear_probe(train_x[rows], train_y[rows], test_x, test_y, cfg, args.val_fraction,
                          num_classes=classes, device=device)  # fmt: skip
    probe = {f"probe_{k}" if k == "batch_size" else k: v for k, v in probe_config_dict(cfg).items()}
    extras = probe | {"val_fraction": args.val_fraction, "lr": result.lr, "grid": result.grid,
                      "feature_cache_hits": cache.hits, "num_train": int(rows.sum()),
                      "num_test": test_x.shape[0]}  # fmt: skip
    return result.metrics(), extras


def semisup_metrics(
    backbone: Backbone, args: argparse.Namespace, device: torch.device, init: str
) -> tuple[dict, dict]:
    """``python -m eval semisup``: the subset, then the chosen mode: ``(metrics, config)``."""
    check_single_process()
    indices, info = _subset(args)
    if args.mode == "linear":
        metrics, extras = _linear(backbone, args, device, init, indices)
    else:
        metrics, extras = run_finetune_eval(backbone, args, device, indices)
    head = {"mode": args.mode, "fraction": args.fraction, "balance": args.balance}
    return metrics, head | info | extras


def semisup_protocol_name(fraction: float, mode: str) -> str:
    """The record's ``protocol``: ``semisup-10pct-finetune`` (so 1% and 10% results, and the
    two modes, are different rows and different pairs for ``eval batch``)."""
    return f"semisup-{fraction * 100:g}pct-{mode}"
