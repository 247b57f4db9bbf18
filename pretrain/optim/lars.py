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

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=group["weight_decay"])
                if group["trust_adaptation"]:
                    update.mul_(trust_ratio(p, update, group["trust_coefficient"]))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def trust_ratio(p: torch.Tensor, update: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """``η · ‖w‖ / ‖u‖``, or 1 when either norm is 0 (LARS with η = 0.001, LAMB with η = 1)."""
    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
    ratio = eta * w_norm / u_norm
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
