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

from pretrain.optim.lars import trust_ratio


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

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1**t)).div_(denom)
                update.add_(p, alpha=group["weight_decay"])
                if group["trust_adaptation"]:
                    update.mul_(trust_ratio(p, update))
                p.add_(update, alpha=-group["lr"])
        return loss
