"""LARS (You, Gitman, Ginsburg 2017) as used by SimCLR/BYOL/Barlow Twins.

For each parameter ``w`` with gradient ``g`` in a group with ``trust_adaptation=True``::

    u = g + wd · w
    trust = η · ‖w‖ / ‖u‖          (1 when either norm is 0)
    v ← μ · v + trust · u
    w ← w − lr · v

Groups with ``trust_adaptation=False`` (biases and norm parameters, by convention) get plain SGD
with momentum and their own weight decay (0 by default).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from pretrain.optim.trust import ShardLayout, local, trust_scales


class LARS(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        trust_adaptation: bool = True,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            trust_adaptation=trust_adaptation,
        )
        super().__init__(params, defaults)

        self.shard_layout: ShardLayout | None = None  # set by sharded engines

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = [local(p.grad).add(local(p), alpha=group["weight_decay"]) for p in params]
            if group["trust_adaptation"]:
                weights = [local(p) for p in params]
                eta = group["trust_coefficient"]
                scales = trust_scales(params, weights, updates, eta, self.shard_layout)
                for u, s in zip(updates, scales, strict=True):
                    u.mul_(s)
            for p, update in zip(params, updates, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:  # same type (DTensor or not) as p
                    state["momentum_buffer"] = torch.zeros_like(p)
                    local(state["momentum_buffer"]).copy_(update)
                else:
                    local(state["momentum_buffer"]).mul_(group["momentum"]).add_(update)
                local(p).add_(local(state["momentum_buffer"]), alpha=-group["lr"])
        return loss
