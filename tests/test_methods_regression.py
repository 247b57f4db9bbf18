"""BYOL, SimSiam, Barlow Twins, VICReg: losses against literal loops of the papers' equations,
2 gloo processes × B/2 versus 1 × B, 20 debug steps, and BYOL's EMA target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.config import load_config
from pretrain.engine import EngineConfig, build_engine
from pretrain.losses.redundancy import barlow_twins_loss, vicreg_loss
from pretrain.losses.regression import negative_cosine_loss, normalized_mse_loss
from pretrain.methods import MethodConfig, StepState, build_method
from pretrain.methods.barlow_twins import BarlowTwinsConfig
from pretrain.methods.byol import BYOLConfig
from pretrain.methods.simsiam import SimSiamConfig
from pretrain.methods.vicreg import VICRegConfig
from pretrain.metrics import read_metrics
from pretrain.optim import OptimConfig, build_optimizer
from pretrain.schedules import cosine_momentum
from pretrain.train import train
from tests.distributed import default_dtype, run_distributed

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"
METHOD_NAMES = ["byol", "simsiam", "barlow_twins", "vicreg"]
B = 8


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- literal equations (loops)


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def literal_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    """BYOL eq. 2: || p/||p|| − z/||z|| ||², averaged over the batch, coordinate by coordinate."""
    total = 0.0
    for pb, zb in zip(p.tolist(), z.tolist(), strict=True):
        np_, nz = _norm(pb), _norm(zb)
        total += sum((a / np_ - c / nz) ** 2 for a, c in zip(pb, zb, strict=True))
    return total / p.shape[0]


def literal_neg_cos(p: torch.Tensor, z: torch.Tensor) -> float:
    """SimSiam eq. 1: −(p/||p||)·(z/||z||), averaged over the batch."""
    total = 0.0
    for pb, zb in zip(p.tolist(), z.tolist(), strict=True):
        total -= sum(a * c for a, c in zip(pb, zb, strict=True)) / (_norm(pb) * _norm(zb))
    return total / p.shape[0]


def literal_standardize(z: list[list[float]], eps: float) -> list[list[float]]:
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        mean = sum(z[b][j] for b in range(n)) / n
        var = sum((z[b][j] - mean) ** 2 for b in range(n)) / n
        for b in range(n):
            out[b][j] = (z[b][j] - mean) / math.sqrt(var + eps)
    return out


def literal_barlow(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> tuple[float, float]:
    """Barlow Twins eq. 2: C_ij = Σ_b z1n_bi z2n_bj / N; returns (Σ_i (1 − C_ii)², Σ_{i≠j} C_ij²)."""
    a, c = literal_standardize(z1.tolist(), eps), literal_standardize(z2.tolist(), eps)
    n, d = len(a), len(a[0])
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            cij = sum(a[b][i] * c[b][j] for b in range(n)) / n
            if i == j:
                on += (1 - cij) ** 2
            else:
                off += cij**2
    return on, off


def literal_vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, float, float]:
    """VICReg eq. 1-5 as loops: invariance, (v(Z) + v(Z'))/2 and c(Z) + c(Z')."""
    a, c = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    inv = sum((a[b][j] - c[b][j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def v(z: list[list[float]]) -> float:
        total = 0.0
        for j in range(d):
            mean = sum(z[b][j] for b in range(n)) / n
            var = sum((z[b][j] - mean) ** 2 for b in range(n)) / (n - 1)
            total += max(0.0, 1 - math.sqrt(var + 1e-4))
        return total / d

    def cov(z: list[list[float]]) -> float:
        means = [sum(z[b][j] for b in range(n)) / n for j in range(d)]
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    cij = sum((z[b][i] - means[i]) * (z[b][j] - means[j]) for b in range(n))
                    total += (cij / (n - 1)) ** 2
        return total / d

    return inv, (v(a) + v(c)) / 2, cov(a) + cov(c)


# ---------------------------------------------------------------- golden tests


def test_byol_and_simsiam_losses_match_literal_equations_and_stop_gradient() -> None:
    p = rand(6, 5, seed=0).requires_grad_(True)
    z = rand(6, 5, seed=1).requires_grad_(True)
    byol, simsiam = normalized_mse_loss(p, z), negative_cosine_loss(p, z)
    assert abs(byol.item() - literal_byol(p.detach(), z.detach())) < 1e-12
    assert abs(simsiam.item() - literal_neg_cos(p.detach(), z.detach())) < 1e-12
    (byol + simsiam).backward()
    assert p.grad is not None and z.grad is None  # the target side gets no gradient


def test_barlow_twins_terms_match_literal_loops() -> None:
    z1, z2 = rand(7, 5, seed=2) * 3 + 1, rand(7, 5, seed=3)
    terms = barlow_twins_loss(z1, z2, lambd=0.0051)
    on, off = literal_barlow(z1, z2)
    assert abs(float(terms.on_diag) - on) < 1e-10
    assert abs(float(terms.off_diag) - off) < 1e-10
    assert abs(float(terms.loss) - (on + 0.0051 * off)) < 1e-10
    # identical views with decorrelated dimensions give C ≈ I: loss ≈ 0
    eye = torch.linalg.qr(rand(16, 4, seed=4))[0] * 4  # orthogonal columns, zero-ish mean
    eye = eye - eye.mean(0)
    assert float(barlow_twins_loss(eye, eye).on_diag) < 1e-5


def test_vicreg_terms_match_literal_loops() -> None:
    z1, z2 = rand(9, 4, seed=5) * 0.5, rand(9, 4, seed=6) * 2
    terms = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    inv, var, cov = literal_vicreg_terms(z1, z2)
    assert abs(float(terms.invariance) - inv) < 1e-12
    assert abs(float(terms.variance) - var) < 1e-12
    assert abs(float(terms.covariance) - cov) < 1e-12
    assert var > 0  # the 0.5-scaled branch is below the hinge, so the term is exercised
    assert abs(float(terms.loss) - (25 * inv + 25 * var + cov)) < 1e-10


# ---------------------------------------------------------------- distributed: 2 × B/2 == 1 × B


def small_config(name: str) -> MethodConfig:
    return {
        "byol": BYOLConfig(hidden_dim=32, dim=16, pred_hidden_dim=32),
        "simsiam": SimSiamConfig(dim=16, pred_hidden_dim=8),
        "barlow_twins": BarlowTwinsConfig(hidden_dim=32, dim=16),
        "vicreg": VICRegConfig(hidden_dim=32, dim=16),
    }[name]


def make_method(name: str) -> nn.Module:
    """A 1-block ViT; the heads' BatchNorms (also in BYOL's target) become global-batch BN."""
    torch.manual_seed(0)
    backbone = build_backbone(
        BackboneConfig("vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs={"depth": 1})
    )
    return build_method(small_config(name), backbone)


def loss_and_grads(rank: int, world: int) -> dict[str, dict]:
    """Per method: loss (mean over ranks) and DDP-averaged student gradients of one step, in
    float64 (one spawn for all four methods keeps the test fast)."""
    with default_dtype(torch.float64):
        return {name: _loss_and_grads(rank, world, name) for name in METHOD_NAMES}


def _loss_and_grads(rank: int, world: int, name: str) -> dict:
    method = build_engine(EngineConfig(), torch.device("cpu")).wrap(make_method(name))
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    b = B // world
    out = method([v[rank * b : (rank + 1) * b] for v in views], StepState(3, 10))
    out.loss.backward()
    loss = out.loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(loss)
        loss /= world
    params = dict(method.student.named_parameters())
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    return {"loss": float(loss), "grads": grads, "names": set(params)}


@pytest.fixture(scope="module")
def one_and_two_processes() -> tuple[dict, list[dict]]:
    return loss_and_grads(0, 1), run_distributed(loss_and_grads, 2)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_two_processes_match_one(one_and_two_processes: tuple, name: str) -> None:
    single_all, ranks_all = one_and_two_processes
    single = single_all[name]
    assert single["grads"].keys() == single["names"]  # every student parameter is checked
    for r in (ranks[name] for ranks in ranks_all):
        assert abs(r["loss"] - single["loss"]) < 1e-10, (r["loss"], single["loss"])
        assert r["grads"].keys() == single["grads"].keys()
        for n, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-7, atol=1e-10, msg=n)


# ---------------------------------------------------------------- debug recipes and BYOL's EMA


@pytest.mark.parametrize("name", [*METHOD_NAMES, "simclr", "mocov3"])
def test_debug_recipe_trains_20_steps(cifar_train_shards: Path, tmp_path: Path, name: str) -> None:
    overrides = [f"data.train={cifar_train_shards}", f"run.dir={tmp_path}", "run.export=false"]
    result = train(load_config(RECIPES / f"{name}.yaml", overrides))
    assert result.finished and result.last_step == 20
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_ema_target_gets_no_gradient_and_moves_by_ema(name: str) -> None:
    """BYOL's target and MoCo v3's momentum encoder (both mirror ``student.encoder``)."""
    cfg = load_config(RECIPES / f"{name}.yaml", ["run.total_steps=10"])
    torch.manual_seed(0)
    engine = build_engine(cfg.engine, torch.device("cpu"))
    method = engine.wrap(build_method(cfg.method, build_backbone(cfg.backbone)))
    assert method.export_backbone() is method.teacher.backbone
    with torch.no_grad():  # make the target differ from the online network
        for p in method.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer, _ = build_optimizer(cfg.optim, method.student, 16)
    old_teacher = {n: p.clone() for n, p in method.teacher.named_parameters()}
    state = StepState(step=4, total_steps=10)
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    method(views, state).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.parameters())
    engine.step(optimizer, list(method.student.parameters()))
    logs = method.after_step(state)
    m = cosine_momentum(4, 10, cfg.method.momentum)
    assert logs["momentum"] == m and cfg.method.momentum < m < 1
    online = dict(method.student.encoder.named_parameters())
    for n, p in method.teacher.named_parameters():
        expected = m * old_teacher[n] + (1 - m) * online[n].detach()
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7, msg=n)


def barlow_after_two_lars_steps(bias_lr_ratio: float, no_decay_lr_scale: float) -> nn.Module:
    """Two LARS steps of a small Barlow Twins; 1-D parameters' lr multiplied by the scale."""
    torch.manual_seed(0)
    cfg = BarlowTwinsConfig(hidden_dim=32, dim=16, bias_lr_ratio=bias_lr_ratio)
    backbone = build_backbone(
        BackboneConfig("vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs={"depth": 1})
    )
    method = build_method(cfg, backbone)
    optimizer, lr = build_optimizer(OptimConfig(weight_decay=1e-3), method.student, 256)
    for group in optimizer.param_groups:
        group["lr"] = lr * (1.0 if group["trust_adaptation"] else no_decay_lr_scale)
    g = torch.Generator().manual_seed(7)
    for step in range(2):
        views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
        method(views, StepState(step, 10)).loss.backward()
        method.on_after_backward(StepState(step, 10))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return method


def test_barlow_bias_lr_ratio_equals_a_lower_lr_for_biases_and_norms() -> None:
    """The paper's 0.0048 / 0.2 lr for biases and BN, done as a gradient scale under LARS."""
    with default_dtype(torch.float64):
        scaled_grad = barlow_after_two_lars_steps(0.024, 1.0)
        scaled_lr = barlow_after_two_lars_steps(1.0, 0.024)
        plain = barlow_after_two_lars_steps(1.0, 1.0)
    changed = 0
    for (n, a), b, c in zip(
        scaled_grad.named_parameters(), scaled_lr.parameters(), plain.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
        changed += int(a.ndim <= 1 and not torch.allclose(a, c))
    assert changed > 5  # the ratio did act on the 1-D parameters
