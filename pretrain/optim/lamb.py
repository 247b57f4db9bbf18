"""LAMB (You et al. 2020, "Large batch optimization for deep learning", Alg. 2).

For each parameter ``w`` with gradient ``g`` at step ``t``::

    m ← β1 m + (1 − β1) g,        v ← β2 v + (1 − β2) g²
    m̂ = m / (1 − β1^t),            v̂ = v / (1 − β2^t)
    r = m̂ / (sqrt(v̂) + eps) + wd · w
    ratio = ‖w‖ / ‖r‖               (1 when either norm is 0, or when the group has
                                     ``trust_adaptation=False``: biases and norms)
    w ← w − lr · ratio · r

Defaults: β = (0.9, 0.999), eps 1e-6 (the paper's code).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from pretrain.optim.trust import ShardLayout, local, trust_scales


class Lamb(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_adaptation: bool = True,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
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
            updates = [self._adam_direction(p, group) for p in params]
            if group["trust_adaptation"]:
                weights = [local(p) for p in params]
                scales = trust_scales(params, weights, updates, 1.0, self.shard_layout)
                for u, s in zip(updates, scales, strict=True):
                    u.mul_(s)
            for p, update in zip(params, updates, strict=True):
                local(p).add_(update, alpha=-group["lr"])
        return loss

    def _adam_direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """``r = m̂ / (sqrt(v̂) + eps) + wd · w`` on this rank's shard (moments updated)."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)  # same type (DTensor or not) as p
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        g, m, v = local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"])
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        update = (m / (1 - beta1**t)).div_(denom)
        return update.add_(local(p), alpha=group["weight_decay"])
