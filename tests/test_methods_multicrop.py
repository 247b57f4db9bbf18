"""DINO and SwAV: multi-crop views, golden losses vs literal loops, Sinkhorn-Knopp marginals,
EMA teacher, 2 processes vs 1, 20-step debug runs and exact resume (SwAV with its queue on)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pretrain import checkpoint as ckpt
from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.config import load_config
from pretrain.data.views import AugConfig, multi_crop_transforms, two_view_transforms, view_maker
from pretrain.engine import EngineConfig, build_engine
from pretrain.export import load_exported_backbone
from pretrain.losses.dino import dino_center_update, dino_loss, teacher_temperature
from pretrain.losses.swav import sinkhorn_knopp, swav_loss
from pretrain.methods import StepState, build_method
from pretrain.methods.dino import DINOConfig
from pretrain.methods.swav import SwAVConfig
from pretrain.metrics import read_metrics
from pretrain.modules.dino_head import multi_crop_features
from pretrain.step import train_step
from pretrain.train import train
from tests.distributed import default_dtype, run_distributed

RECIPES = Path(__file__).resolve().parents[1] / "pretrain" / "recipes" / "debug"


# ---------------------------------------------------------------- literal formulations


def literal_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def literal_dino(s_out, t_out, center, n_crops, ts, tt) -> float:
    """Caron et al. 2021 Alg. 1, pair by pair and sample by sample."""
    b = t_out.shape[0] // 2
    total, terms = 0.0, 0
    for t in range(2):
        for s in range(n_crops):
            if s == t:
                continue
            pair = 0.0
            for i in range(b):
                p_t = literal_softmax(
                    [
                        (float(x) - float(c)) / tt
                        for x, c in zip(t_out[t * b + i], center[0], strict=True)
                    ]
                )
                p_s = literal_softmax([float(x) / ts for x in s_out[s * b + i]])
                pair += -sum(p * math.log(q) for p, q in zip(p_t, p_s, strict=True))
            total += pair / b
            terms += 1
    return total / terms


def literal_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> list[list[float]]:
    """The paper's Alg. 1 on a K×B list of lists: rows → 1/K, columns → 1/B, then × B."""
    b, k = scores.shape
    q = [[math.exp(float(scores[j, i]) / eps) for j in range(b)] for i in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[i][j] for i in range(k)) for j in range(b)]
        q = [[q[i][j] / cols[j] / b for j in range(b)] for i in range(k)]
    return [[q[i][j] * b for i in range(k)] for j in range(b)]  # [B][K]


def literal_swav(scores: list[torch.Tensor], codes: list[torch.Tensor], temp: float) -> float:
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v != i:
                rows = [literal_softmax([float(x) / temp for x in r]) for r in s]
                sub += sum(
                    -sum(float(qk) * math.log(pk) for qk, pk in zip(q[n], rows[n], strict=True))
                    for n in range(len(rows))
                ) / len(rows)
        total += sub / (len(scores) - 1)
    return total / len(codes)


# ---------------------------------------------------------------- golden tests


def test_dino_loss_matches_literal_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, v = 3, 5, 4
    s_out = torch.randn(v * b, k, generator=g, dtype=torch.float64)
    t_out = torch.randn(2 * b, k, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64)
    got = float(dino_loss(s_out, t_out, center, v, 0.1, 0.04))
    assert abs(got - literal_dino(s_out, t_out, center, v, 0.1, 0.04)) < 1e-9
    # 2 crops only: each global predicts only the other one
    got2 = float(dino_loss(s_out[: 2 * b], t_out, center, 2, 0.1, 0.07))
    assert abs(got2 - literal_dino(s_out[: 2 * b], t_out, center, 2, 0.1, 0.07)) < 1e-9


def test_dino_center_update_is_ema_of_batch_mean() -> None:
    g = torch.Generator().manual_seed(1)
    t_out = torch.randn(6, 4, generator=g, dtype=torch.float64)
    center = torch.randn(1, 4, generator=g, dtype=torch.float64)
    got = dino_center_update(center, t_out, 0.9)
    for k in range(4):
        mean = sum(float(t_out[i, k]) for i in range(6)) / 6
        assert abs(float(got[0, k]) - (0.9 * float(center[0, k]) + 0.1 * mean)) < 1e-12


def test_teacher_temperature_warmup() -> None:
    temps = [teacher_temperature(s, 4, 0.04, 0.07) for s in range(6)]
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07


def test_sinkhorn_matches_literal_and_marginals() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64))
    got = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(
        got,
        torch.tensor(literal_sinkhorn(scores, 0.05, 3), dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )
    # each sample's code sums to 1 (Q^T 1_K = 1/B before the × B)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(6, dtype=torch.float64))
    # converged: equal partition Q 1_B = 1/K per prototype, i.e. B/K after the × B
    conv = sinkhorn_knopp(scores, 0.5, 300)
    torch.testing.assert_close(conv.sum(dim=0), torch.full((4,), 6 / 4, dtype=torch.float64))
    assert bool((conv >= 0).all())


def test_swav_loss_matches_literal_loops() -> None:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    codes = [
        torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), 1) for _ in range(2)
    ]
    got = float(swav_loss(scores, codes, 0.1))
    assert abs(got - literal_swav(scores, codes, 0.1)) < 1e-9


# ---------------------------------------------------------------- views and grouping


def test_multi_crop_views_sizes_and_default_two_view_unchanged() -> None:
    aug = AugConfig(size=16, local_crops=3, local_size=8, global_scale=(0.3, 1.0))
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    views = view_maker("multi_crop", aug)(img)
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    ts = multi_crop_transforms(AugConfig())
    assert len(ts) == 2 + 8
    crops = [t.transforms[0] for t in ts]
    assert [c.scale for c in crops] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    assert [c.size for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 8
    local_ops = ts[-1].transforms
    blur = [
        op
        for op in local_ops
        if isinstance(op, T.RandomApply) and isinstance(op.transforms[0], T.GaussianBlur)
    ]
    assert len(blur) == 1 and blur[0].p == 0.5
    assert not any(isinstance(op, T.RandomSolarize) for op in local_ops)
    two = two_view_transforms(AugConfig())  # the two-view recipe ignores the multi-crop fields
    assert len(two) == 2 and two[0].transforms[0].scale == (0.08, 1.0)


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.mean(dim=(2, 3))


def test_multi_crop_features_groups_equal_sizes() -> None:
    views = [torch.randn(2, 3, 8, 8) for _ in range(2)] + [
        torch.randn(2, 3, 4, 4) for _ in range(3)
    ]
    rec = Recorder()
    out = multi_crop_features(rec, views)
    assert rec.calls == [4, 6]
    torch.testing.assert_close(out, torch.cat([v.mean(dim=(2, 3)) for v in views]))


# ---------------------------------------------------------------- methods

B = 8


def vit_tiny() -> nn.Module:
    kwargs = {"depth": 1, "dynamic_img_size": True}
    return build_backbone(
        BackboneConfig("vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs=kwargs)
    )


def make_method(name: str, resnet: bool = True, **cfg) -> nn.Module:
    """Tiny DINO on a 1-block ViT; tiny SwAV on a CIFAR-stem ResNet-18 (BatchNorm across
    ranks and crop groups) or, where BN does not matter, the ViT (cheaper)."""
    torch.manual_seed(0)
    if name == "dino":
        c = DINOConfig(out_dim=32, hidden_dim=32, bottleneck_dim=16, **cfg)
        return build_method(c, vit_tiny())
    c = SwAVConfig(hidden_dim=32, dim=16, nmb_prototypes=12, **cfg)
    backbone = build_backbone(BackboneConfig("resnet18", cifar_stem=True)) if resnet else vit_tiny()
    return build_method(c, backbone)


def make_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    sizes = [16, 16, 8, 8]
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def test_dino_teacher_is_ema_of_student_and_last_layer_frozen() -> None:
    method = make_method("dino", freeze_last_layer_steps=1, momentum=0.9)
    engine = build_engine(EngineConfig(channels_last=False), torch.device("cpu"))
    method = engine.wrap(method)
    opt = torch.optim.AdamW([p for p in method.student.parameters() if p.requires_grad], lr=1e-2)
    old_teacher = {n: p.clone() for n, p in method.teacher.named_parameters()}
    old_last = method.student.head.last_layer.weight_v.clone()
    state = StepState(step=0, total_steps=10)
    train_step(method, engine, opt, make_views(), state)
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert torch.equal(method.student.head.last_layer.weight_v, old_last)  # frozen at step 0
    m = method.momentum(state)
    assert m == pytest.approx(0.9)
    student = dict(method.student.named_parameters())
    moved = 0
    for n, p in method.teacher.named_parameters():
        torch.testing.assert_close(p, m * old_teacher[n] + (1 - m) * student[n].detach())
        moved += not torch.equal(p, old_teacher[n])
    assert moved > 0
    assert float(method.center.abs().sum()) > 0  # updated in forward
    train_step(method, engine, opt, make_views(), StepState(step=1, total_steps=10))
    assert not torch.equal(method.student.head.last_layer.weight_v, old_last)  # unfrozen


def test_swav_prototypes_frozen_normalised_and_queue_filled() -> None:
    method = make_method(
        "swav", resnet=False, freeze_prototypes_steps=1, queue_length=16, queue_start_step=1
    )
    opt = torch.optim.SGD(method.student.parameters(), lr=0.5)
    engine = build_engine(EngineConfig(channels_last=False), torch.device("cpu"))
    method = engine.wrap(method)
    protos = method.student.prototypes.weight
    for step in range(3):
        before = torch.nn.functional.normalize(protos.detach(), dim=1)
        train_step(method, engine, opt, make_views(), StepState(step=step, total_steps=10))
        if step == 0:  # frozen: only the re-normalisation touched them; queue not started
            torch.testing.assert_close(protos.detach(), before)
            assert float(method.queue.abs().sum()) == 0
    norms = method.student.prototypes.weight.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # stepped after normalising
    assert bool((method.queue.norm(dim=2) > 0.99).all())  # full: 2 batches of unit vectors


# ---------------------------------------------------------------- 2 processes vs 1


def loss_grads(rank: int, world: int, name: str) -> dict:
    with default_dtype(torch.float64):
        cfg = {"queue_length": 8} if name == "swav" else {}
        method = build_engine(EngineConfig(), torch.device("cpu")).wrap(make_method(name, **cfg))
        if name == "swav":  # a full queue (every rank holds it all and scores its slice)
            g = torch.Generator().manual_seed(7)
            full = torch.nn.functional.normalize(torch.randn(2, 8, 16, generator=g), dim=2)
            method.queue.copy_(full)
        b = B // world
        views = [v[rank * b : (rank + 1) * b] for v in make_views()]
        out = method(views, StepState(step=0, total_steps=10))
        out.loss.backward()
        loss = out.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        grads = {
            n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None
        }
        extra = method.center.clone() if name == "dino" else method.queue.clone()
        return {"loss": float(loss), "grads": grads, "extra": extra}


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_two_processes_match_one(name: str) -> None:
    single = loss_grads(0, 1, name)
    ranks = run_distributed(loss_grads, 2, name)
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-10, (r["loss"], single["loss"])
        assert r["grads"].keys() == single["grads"].keys()
        for n, g in single["grads"].items():
            # timm resamples pos_embed for the local crops in float32 (reduction order ~1e-9)
            atol = 1e-7 if n.endswith("pos_embed") else 1e-10
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-7, atol=atol, msg=n)
        # DINO's center; SwAV's queue after the update, on every rank that of one process
        torch.testing.assert_close(r["extra"], single["extra"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- end to end


def run_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train={shards}", f"run.dir={run_dir}", "checkpoint.every=100", *extra]


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_debug_recipe_trains_20_steps(cifar_train_shards: Path, tmp_path: Path, name: str) -> None:
    result = train(
        load_config(RECIPES / f"{name}.yaml", run_overrides(cifar_train_shards, tmp_path))
    )
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 21)) and result.finished
    assert all(math.isfinite(m["loss"]) for m in metrics)
    exported = load_exported_backbone(result.export_dir).state_dict()
    state = torch.load(ckpt.latest_checkpoint(tmp_path) / "state.pt", weights_only=True)["model"]
    prefix = "teacher.backbone." if name == "dino" else "student.backbone."
    for key, value in exported.items():
        assert torch.equal(value, state[prefix + key]), key


@pytest.mark.parametrize("name", ["dino", "swav"])
def test_exact_resume(cifar_train_shards: Path, tmp_path: Path, name: str) -> None:
    """SwAV's queue is filled at steps 0-1 and used from step 2, before the checkpoint at 3."""
    steps, recipe = 6, RECIPES / f"{name}.yaml"
    extra = (
        [f"run.total_steps={steps}", "method.queue_start_step=0"]
        if name == "swav"
        else [f"run.total_steps={steps}"]
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(recipe, run_overrides(cifar_train_shards, straight, *extra)))
    half = train(
        load_config(
            recipe,
            run_overrides(cifar_train_shards, resumed, *extra, f"run.stop_after={steps // 2}"),
        )
    )
    assert half.last_step == steps // 2 and not half.finished
    train(load_config(recipe, run_overrides(cifar_train_shards, resumed, *extra)))
    losses = [[(m["step"], m["loss"]) for m in read_metrics(d)] for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == steps
    a = torch.load(ckpt.latest_checkpoint(straight) / "state.pt", weights_only=True)["model"]
    b = torch.load(ckpt.latest_checkpoint(resumed) / "state.pt", weights_only=True)["model"]
    buffer = "center" if name == "dino" else "queue"
    assert float(a[buffer].abs().sum()) > 0
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
