"""One training step: the only place where backward happens."""

from __future__ import annotations

import torch

from pretrain.engine.base import Engine
from pretrain.methods.base import LossOutput, Method, StepState


def train_step(
    method: Method,
    engine: Engine,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    state: StepState,
) -> tuple[LossOutput, dict[str, float]]:
    """forward (autocast) → backward → method hook → optimizer step → after-step (EMA, ...)."""
    with engine.autocast():
        out = method(views, state)
    engine.backward(out.loss)
    method.on_after_backward(state)
    logs = engine.step(optimizer, [p for p in method.student.parameters() if p.requires_grad])
    logs.update(method.after_step(state))
    return out, logs
