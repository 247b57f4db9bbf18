"""Linear probe of frozen features (the MAE recipe), a learning-rate grid in one pass.

The head is MAE's (He et al. 2022, ``main_linprobe.py``): ``BatchNorm1d(D, affine=False)`` on
the raw pooled backbone features, then ``Linear(D, C)`` (weights ~ N(0, 0.01²), bias 0), trained
with cross-entropy by SGD (momentum 0.9) or LARS (``pretrain.optim.lars.LARS``; weights
trust-adapted, biases plain SGD), weight decay 0 by default, a per-step cosine learning rate
after a linear warmup.

**One pass over a grid of learning rates.** ``G`` heads (one per learning rate, all starting
from the same weights) see the same feature batches; the loss is ``sum_g CE(head_g(bn(x)), y)``.
The heads share no parameters (the BatchNorm has none, and its running statistics depend on the
batches only), so ``d loss / d head_g = d CE_g / d head_g``: every head follows exactly the path
it would follow trained alone (``tests/test_eval_linear.py`` checks this). Each head is its own
optimizer parameter group with its own learning rate, so LARS trust ratios stay per head.

**Selection.** A seeded ``val_fraction`` of the train set is held out; the learning rate whose
head has the best validation top-1 (the first such in grid order) is chosen, and only that head
is evaluated on the test set. Accuracies are in percent.

**Feature cache** (:class:`FeatureCache`). Features are stored once per (weights sha256, init,
dataset, image size, normalisation, sample limit, split) as a torch file of raw features
``[N, D]`` (float32), labels ``[N]`` and global sample indices ``[N]``, written atomically
(temporary file + rename); a later run with the same key loads it instead of running the
backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from eval.runner import is_main
from pretrain.optim.lars import LARS

log = logging.getLogger(__name__)

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
OPTIMIZERS = ("sgd", "lars")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sslpipe/features`` (``~/.cache/sslpipe/features`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sslpipe" / "features"


def add_cache_args(p: argparse.ArgumentParser, scope: str = "") -> None:
    """``--cache-dir`` / ``--no-cache``: the feature cache ``knn``, ``linear`` and ``semisup``
    (linear mode) share, so a batch extracts each checkpoint's features once."""
    p.add_argument(
        "--cache-dir", default=str(default_cache_dir()), metavar="DIR",
        help=f"{scope}feature cache directory, one <key>.pt per (weights sha256, data, input "
        "settings, sample limit, split), shared by knn, linear and semisup; delete it to "
        "recompute (default: $XDG_CACHE_HOME/sslpipe/features, i.e. ~/.cache/sslpipe/features)",
    )  # fmt: skip
    p.add_argument(
        "--no-cache", action="store_true", help=f"{scope}neither read nor write the feature cache"
    )


def cache_of(args: argparse.Namespace) -> FeatureCache:
    """The feature cache the ``--cache-dir`` / ``--no-cache`` options name."""
    return FeatureCache(None if args.no_cache else args.cache_dir)


def cache_report(cache: FeatureCache) -> dict[str, Any]:
    """The ``feature_cache`` entry of a record: hits of this run (train and test) and the dir."""
    return {"hit": cache.hits == 2, "hits": cache.hits, "dir": cache.root and str(cache.root)}


@dataclass(frozen=True)
class ProbeConfig:
    """Training hyper-parameters of the probe; ``lrs`` is the grid trained in one pass."""

    lrs: tuple[float, ...] = DEFAULT_LRS
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 1024
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, got {self.lrs}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`: test metrics of the chosen head and the whole grid."""

    top1: float
    top5: float
    val_top1: float
    lr: float
    grid: list[dict[str, float]] = field(default_factory=list)  # [{"lr", "val_top1"}] per head

    def metrics(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "val_top1": self.val_top1}


class ProbeHeads(nn.Module):
    """``G`` linear heads behind one parameter-free BatchNorm: ``[B, D] -> [G, B, C]``."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, seed: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_classes, dim, generator=gen) * 0.01  # MAE: trunc_normal std 0.01
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        with torch.no_grad():
            for head in self.heads:  # every head starts from the same weights
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(x)  # [B, D]
        return torch.stack([head(z) for head in self.heads])  # [G, B, C]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


def _optimizer(heads: ProbeHeads, cfg: ProbeConfig) -> torch.optim.Optimizer:
    """One parameter group per head (per learning rate); ``base_lr`` is the grid value."""
    if cfg.optimizer == "sgd":
        groups = [
            {"params": list(head.parameters()), "lr": lr, "base_lr": lr}
            for head, lr in zip(heads.heads, cfg.lrs, strict=True)
        ]
        return torch.optim.SGD(groups, lr=cfg.lrs[0], momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)  # fmt: skip
    groups = []
    for head, lr in zip(heads.heads, cfg.lrs, strict=True):
        groups.append({"params": [head.weight], "lr": lr, "base_lr": lr})
        groups.append({"params": [head.bias], "lr": lr, "base_lr": lr,
                       "weight_decay": 0.0, "trust_adaptation": False})  # fmt: skip
    return LARS(groups, lr=cfg.lrs[0], momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_probes(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig
) -> ProbeHeads:
    """Train one head per ``cfg.lrs`` on ``feats [N, D]``, ``labels [N]`` (on their device).

    Batches: a fresh seeded permutation each epoch (``cfg.seed``), ``cfg.batch_size`` rows each;
    a trailing batch of one row is skipped (BatchNorm needs two). Returns the heads in eval mode.
    """
    device = feats.device
    n, dim = feats.shape
    heads = ProbeHeads(dim, num_classes, len(cfg.lrs), cfg.seed).to(device)
    opt = _optimizer(heads, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = sum(1 for s in range(0, n, cfg.batch_size) if min(cfg.batch_size, n - s) > 1)
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    labels = labels.to(device)
    step = 0
    heads.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if idx.numel() < 2:
                continue
            factor = lr_factor(step, total, warmup)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            logits = heads(feats[idx])  # [G, b, C]
            target = labels[idx]
            loss = sum(F.cross_entropy(g_logits, target) for g_logits in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return heads.eval()


@torch.no_grad()
def head_accuracies(
    heads: ProbeHeads, feats: torch.Tensor, labels: torch.Tensor, chunk_size: int = 8192
) -> tuple[list[float], list[float]]:
    """Per-head top-1 and top-5 accuracy (percent) on ``feats [M, D]``, ``labels [M]``.

    With fewer than 5 classes "top5" is top-``C`` (100).
    """
    heads.eval()
    num_heads = len(heads.heads)
    hit1 = torch.zeros(num_heads, dtype=torch.long)
    hit5 = torch.zeros(num_heads, dtype=torch.long)
    labels = labels.to(feats.device)
    for start in range(0, feats.shape[0], chunk_size):
        logits = heads(feats[start : start + chunk_size])  # [G, b, C]
        target = labels[start : start + chunk_size].view(1, -1, 1)  # [1, b, 1]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [G, b, k]
        hits = top == target  # [G, b, k]
        hit1 += hits[..., 0].sum(dim=1).cpu()
        hit5 += hits.any(dim=-1).sum(dim=1).cpu()
    total = max(feats.shape[0], 1)
    return (100.0 * hit1 / total).tolist(), (100.0 * hit5 / total).tolist()


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint ``(train_rows, val_rows)`` of ``range(n)``; ``round(n * val_fraction)``
    rows (at least 1, at most ``n - 2``) are held out for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 3:
        raise ValueError(f"a linear probe needs at least 3 train samples, got {n}")
    num_val = min(max(round(n * val_fraction), 1), n - 2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[num_val:].sort().values, perm[:num_val].sort().values


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Hold out ``val_fraction`` of the train features, train the lr grid on the rest, pick the
    lr with the best validation top-1 and report that head's test top-1 / top-5.

    ``train_feats [N, D]``, ``train_labels [N]``, ``test_feats [M, D]``, ``test_labels [M]``;
    ``num_classes`` defaults to ``max(train_labels, test_labels) + 1``; ``device`` to the
    features' device.
    """
    device = torch.device(device) if device is not None else train_feats.device
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fit_rows, val_rows = split_train_val(train_feats.shape[0], val_fraction, cfg.seed)
    train_feats = train_feats.to(device, torch.float32)
    train_labels = train_labels.to(device)
    fit_rows, val_rows = fit_rows.to(device), val_rows.to(device)
    heads = train_probes(train_feats[fit_rows], train_labels[fit_rows], num_classes, cfg)
    val_top1, _ = head_accuracies(heads, train_feats[val_rows], train_labels[val_rows])
    best = max(range(len(cfg.lrs)), key=lambda g: (val_top1[g], -g))  # first of the best
    test_top1, test_top5 = head_accuracies(
        heads, test_feats.to(device, torch.float32), test_labels.to(device)
    )
    grid = [{"lr": lr, "val_top1": acc} for lr, acc in zip(cfg.lrs, val_top1, strict=True)]
    for row in grid:
        log.info("linear probe lr %g: val top1 %.2f", row["lr"], row["val_top1"])
    return ProbeResult(test_top1[best], test_top5[best], val_top1[best], cfg.lrs[best], grid)


def probe_config_dict(cfg: ProbeConfig) -> dict[str, Any]:
    """The config as JSON-friendly values (``lrs`` as a list)."""
    return asdict(cfg) | {"lrs": list(cfg.lrs)}


# ----------------------------------------------------------------------------- feature cache


def _data_fingerprint(data_path: str | os.PathLike) -> str:
    """The resolved data path, plus the sha256 of its ``manifest.json`` for shard directories."""
    p = Path(data_path).resolve()
    manifest = p / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""
    return f"{p}|{digest}"


def cache_key(
    sha256: str,
    data_path: str | os.PathLike,
    split: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_samples: int | None,
    init: str = "trained",
) -> str:
    """A hex digest naming the features of one (weights, data, preprocessing, split)."""
    fields = {
        "version": CACHE_VERSION,
        "sha256": sha256,
        "init": init,
        "data": _data_fingerprint(data_path),
        "split": split,
        "image_size": image_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "max_samples": max_samples,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """Raw features in ``root/<key>.pt``: ``{"features" [N, D], "labels" [N], "index" [N]}``.

    :meth:`get` runs ``extract()`` (which returns those three tensors) only on a miss; every rank
    follows rank 0's hit-or-miss decision, and only rank 0 writes (temp file + rename).
    ``root=None`` disables caching. ``hits`` counts the loads of this instance.
    """

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root).expanduser() if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.pt" if self.root is not None else None

    def get(
        self, key: str, extract: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.path(key)
        hit = path is not None and path.is_file()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = [hit]
            dist.broadcast_object_list(flag, src=0)  # extraction is collective: agree on it
            hit = bool(flag[0])
        if hit:
            data = torch.load(path, map_location="cpu", weights_only=True)
            self.hits += 1
            log.info("feature cache hit: %s %s", path, tuple(data["features"].shape))
            return data["features"], data["labels"], data["index"]
        self.misses += 1
        feats, labels, index = extract()
        if path is not None and is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            data = {"features": feats.float().cpu(), "labels": labels.cpu(), "index": index.cpu()}
            torch.save(data, tmp)
            os.replace(tmp, path)
            log.info("feature cache: wrote %s %s", path, tuple(feats.shape))
        return feats, labels, index
