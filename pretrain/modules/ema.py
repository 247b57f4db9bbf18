"""Exponential-moving-average teachers (MoCo, BYOL, DINO)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pretrain.optim.trust import local


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student``: same weights, ``requires_grad=False`` everywhere."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m · θ_t + (1 − m) · θ_s`` for every parameter, in place on local tensors.

    Parameters are matched by name, so ``teacher`` may be a sub-structure of ``student``'s
    layout as long as the names agree. No communication: under sharding each rank updates the
    shard it holds.
    """
    student_params = dict(student.named_parameters())
    pairs = [(local(t), local(student_params[n])) for n, t in teacher.named_parameters()]
    torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 1.0 - momentum)
