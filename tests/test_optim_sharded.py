"""LARS and LAMB on FSDP2-sharded parameters give the single-process update (float64, 2 ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from pretrain.optim import OptimConfig, build_optimizer
from pretrain.optim.trust import ShardLayout, local, trust_scales
from tests.distributed import default_dtype, run_distributed

STEPS = 3


def make_model() -> nn.Module:
    """Rows 7 and 5 split unevenly over 2 ranks (4 + 3, 3 + 2); a LayerNorm (not adapted)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Linear(7, 5))


def train(model: nn.Module, optimizer, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))  # same on all ranks
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def sharded_vs_single(rank: int, world: int, name: str, use_layout: bool) -> float:
    cfg = OptimConfig(name=name, base_lr=0.5, lr_scaling="none", weight_decay=0.1)
    with default_dtype(torch.float64):
        reference = make_model()
        sharded = copy.deepcopy(reference)
        fully_shard(sharded[0])
        fully_shard(sharded)
        ref_opt, _ = build_optimizer(cfg, reference, 8)
        opt, _ = build_optimizer(cfg, sharded, 8)
        if use_layout:
            opt.shard_layout = ShardLayout.for_dtensors(list(sharded.parameters()))
        train(reference, ref_opt, STEPS)
        train(sharded, opt, STEPS)
        full = {n: p.full_tensor() for n, p in sharded.named_parameters()}
        return max((full[n] - p).abs().max().item() for n, p in reference.named_parameters())


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trust_ratio_uses_whole_parameter_norms_under_fsdp(name: str) -> None:
    exact = run_distributed(sharded_vs_single, 2, name, True)
    assert max(exact) < 1e-12
    # Without the layout each rank would use its shard's norms: a visibly different update.
    naive = run_distributed(sharded_vs_single, 2, name, False)
    assert max(naive) > 1e-6


def test_trust_scales_of_flat_buffers_match_per_parameter_ratios() -> None:
    """A flat buffer concatenating stretches of several parameters (how ZeRO hands them to the
    optimizer) gets, per element, the ratio of the parameter the element belongs to."""
    with default_dtype(torch.float64):
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(n, generator=g) for n in (5, 3, 4)]
        updates = [torch.randn(n, generator=g) for n in (5, 3, 4)]
        expected = [0.01 * w.norm() / u.norm() for w, u in zip(weights, updates, strict=True)]
        # Two flat buffers: [w0[:2] w1] and [w0[2:] w2 pad(2)]; the padding gets spare key 3.
        flat_w = [
            torch.cat([weights[0][:2], weights[1]]),
            torch.cat([weights[0][2:], weights[2], torch.zeros(2)]),
        ]
        flat_u = [
            torch.cat([updates[0][:2], updates[1]]),
            torch.cat([updates[0][2:], updates[2], torch.ones(2)]),
        ]
        layout = ShardLayout(num_params=4)
        layout.segments[id(flat_w[0])] = [(0, 2), (1, 3)]
        layout.segments[id(flat_w[1])] = [(0, 3), (2, 4), (3, 2)]
        scales = trust_scales(flat_w, flat_w, flat_u, 0.01, layout)
        assert torch.allclose(scales[0], torch.cat([expected[0].repeat(2), expected[1].repeat(3)]))
        assert torch.allclose(
            scales[1][:7], torch.cat([expected[0].repeat(3), expected[2].repeat(4)])
        )
        assert local(flat_w[0]) is flat_w[0]
