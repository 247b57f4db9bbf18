"""2 gloo processes × B/2 versus 1 process × B: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.backbones import BackboneConfig, build_backbone
from pretrain.engine import EngineConfig, build_engine
from pretrain.methods import StepState, build_method
from pretrain.methods.mocov3 import MoCoV3Config
from pretrain.methods.simclr import SimCLRConfig
from pretrain.modules.sync_bn import GlobalBatchNorm
from tests.distributed import default_dtype, run_distributed

B = 8


def make_method(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "simclr":
        backbone = build_backbone(BackboneConfig("resnet18", cifar_stem=True))
        return build_method(
            SimCLRConfig(temperature=0.5, proj_hidden_dim=64, proj_dim=16), backbone
        )
    backbone = build_backbone(
        BackboneConfig("vit_tiny_patch16_224", img_size=16, patch_size=4, kwargs={"depth": 1})
    )
    return build_method(MoCoV3Config(hidden_dim=64, dim=16), backbone)


def make_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]


def loss_and_grads(rank: int, world: int, name: str, dtype: torch.dtype = torch.float32) -> dict:
    """Loss (mean over ranks) and averaged gradients of one step on this rank's slice."""
    with default_dtype(dtype):
        return _loss_and_grads(rank, world, name)


def _loss_and_grads(rank: int, world: int, name: str) -> dict:
    method = build_engine(EngineConfig(), torch.device("cpu")).wrap(make_method(name))
    b = B // world
    views = [v[rank * b : (rank + 1) * b] for v in make_views()]
    out = method(views, StepState(step=0, total_steps=10))
    out.loss.backward()
    loss = out.loss.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(loss)
        loss /= world
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    return {"loss": float(loss), "grads": grads}


@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_two_processes_match_one(name: str) -> None:
    """In float64, so the tolerance can be tight: in float32 the two reduction orders differ
    by ~1e-3 relative in the deepest BatchNorm gradients (batch of 8 per rank)."""
    single = loss_and_grads(0, 1, name, torch.float64)
    ranks = run_distributed(loss_and_grads, 2, name, torch.float64)
    for r in ranks:
        assert abs(r["loss"] - single["loss"]) < 1e-10, (r["loss"], single["loss"])
        assert r["grads"].keys() == single["grads"].keys()
        for n, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-7, atol=1e-10, msg=n)


def global_bn_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    bn = GlobalBatchNorm(3)
    b = 8 // world
    local = x[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    y = bn(local)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    return {"y": y.detach(), "grad": local.grad, "mean": bn.running_mean, "var": bn.running_var}


def test_global_batchnorm_equals_batchnorm_on_whole_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4).requires_grad_(True)
    ref = nn.BatchNorm2d(3)
    y = ref(x)
    weights = torch.arange(y.numel()).view_as(y)
    ranks = run_distributed(global_bn_rank, 2)
    # rank r saw rows r*4:(r+1)*4 and its loss used weights of its own slice only
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["y"], y[r * 4 : (r + 1) * 4].detach())
        torch.testing.assert_close(out["mean"], ref.running_mean)
        torch.testing.assert_close(out["var"], ref.running_var)
    local_weights = torch.cat([torch.arange(4 * 3 * 16).view(4, 3, 4, 4)] * 2)
    (y * local_weights).sum().backward()
    grad = torch.cat([ranks[0]["grad"], ranks[1]["grad"]])
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)
    assert weights.shape == y.shape
