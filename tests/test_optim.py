"""LAMB and LARS against literal per-parameter formulas; layer-wise lr decay groups."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from pretrain.optim import OptimConfig, build_optimizer, param_groups
from pretrain.optim.lamb import Lamb
from pretrain.optim.lars import LARS
from pretrain.optim.layer_decay import layer_decay_param_groups


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()


def gradients(step: int, model: nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def literal_lamb(w, grads, lr, wd, adapt, b1=0.9, b2=0.999, eps=1e-6):
    """LAMB (You et al. 2020, Alg. 2) on flat Python lists, one parameter tensor at a time."""
    w, m, v = list(w), [0.0] * len(w), [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        r = [
            (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi
            for mi, vi, wi in zip(m, v, w, strict=True)
        ]
        ratio = norm(w) / norm(r) if adapt and norm(w) > 0 and norm(r) > 0 else 1.0
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r, strict=True)]
    return w


def literal_lars(w, grads, lr, wd, adapt, mu=0.9, eta=0.001):
    """LARS as SimCLR/BYOL use it: trust ratio on (g + wd·w), then heavy-ball momentum."""
    w, buf = list(w), None
    for g in grads:
        u = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
        trust = eta * norm(w) / norm(u) if adapt and norm(w) > 0 and norm(u) > 0 else 1.0
        u = [trust * ui for ui in u]
        buf = u if buf is None else [mu * bi + ui for bi, ui in zip(buf, u, strict=True)]
        w = [wi - lr * bi for wi, bi in zip(w, buf, strict=True)]
    return w


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize(("opt_cls", "literal"), [(Lamb, literal_lamb), (LARS, literal_lars)])
def test_optimizer_matches_literal_formula(opt_cls, literal, steps: int) -> None:
    model = tiny_model()
    lr, wd = 0.1, 0.01
    start = [p.detach().flatten().tolist() for p in model.parameters()]
    opt = opt_cls(param_groups(model, wd), lr=lr)
    grads = [gradients(s, model) for s in range(steps)]
    for s in range(steps):
        for p, g in zip(model.parameters(), grads[s], strict=True):
            p.grad = g.clone()
        opt.step()
    for i, p in enumerate(model.parameters()):
        adapt = p.ndim > 1  # 1-D parameters: no decay, no adaptation
        expected = literal(
            start[i], [g[i].flatten().tolist() for g in grads], lr, wd if adapt else 0.0, adapt
        )
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(expected).double())


def test_lamb_trust_ratio_is_one_for_zero_weights() -> None:
    w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    w.grad = torch.ones(3, 2, dtype=torch.float64)
    Lamb([{"params": [w], "weight_decay": 0.0, "trust_adaptation": True}], lr=0.5).step()
    # m̂ = g, v̂ = g², r = 1 / (1 + eps); ‖w‖ = 0 → ratio 1.
    torch.testing.assert_close(w.detach(), torch.full((3, 2), -0.5 / (1 + 1e-6)).double())


def test_layer_decay_scales_of_a_tiny_vit() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3)
    wrapper = nn.ModuleDict({"backbone": vit, "head": nn.Linear(192, 4)})
    groups = layer_decay_param_groups(wrapper, weight_decay=0.05, decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(wrapper.named_parameters())
    expected = {  # decay^(L + 1 - layer_id), L = 3
        "backbone.patch_embed.proj.weight": (0.5**4, 0.05),
        "backbone.cls_token": (0.5**4, 0.0),
        "backbone.pos_embed": (0.5**4, 0.0),
        "backbone.blocks.0.attn.qkv.weight": (0.5**3, 0.05),
        "backbone.blocks.0.norm1.weight": (0.5**3, 0.0),
        "backbone.blocks.2.mlp.fc2.bias": (0.5**1, 0.0),
        "backbone.blocks.2.mlp.fc2.weight": (0.5**1, 0.05),
        "backbone.norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
    }
    for name, (scale, wd) in expected.items():
        group = by_param[id(names[name])]
        assert group["lr_scale"] == pytest.approx(scale), name
        assert group["weight_decay"] == wd, name
        assert group["trust_adaptation"] == (wd > 0), name
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_build_optimizer_lamb_with_layer_decay() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2)
    cfg = OptimConfig(name="lamb", base_lr=1e-3, layer_decay=0.75, weight_decay=0.05)
    cfg.validate()
    opt, lr = build_optimizer(cfg, vit, 512)
    assert isinstance(opt, Lamb) and lr == pytest.approx(2e-3)
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == pytest.approx(
        [0.75**3, 0.75**2, 0.75, 1.0]
    )
    with pytest.raises(ValueError, match="optim.layer_decay"):
        OptimConfig(layer_decay=1.5).validate()


def test_fused_optimizers_only_when_asked_or_all_params_on_cuda():
    from pretrain.optim import OptimConfig, build_optimizer, use_fused

    cpu = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert use_fused(None, cpu) is None and use_fused(False, cpu) is False
    assert use_fused(True, cpu) is True and use_fused(None, []) is None
    opt, _ = build_optimizer(OptimConfig(name="adamw"), torch.nn.Linear(3, 3), 256)
    assert opt.defaults["fused"] is None  # CPU parameters: PyTorch's default (foreach)
