"""DINO's self-distillation loss and its centering (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", §3.1, Alg. 1).

Teacher probabilities ``P_t = softmax((g_t(x) − c) / τ_t)`` (centered, sharpened), student
``P_s = softmax(g_s(x') / τ_s)``; the loss is the cross-entropy ``H(P_t, P_s) = −Σ_k P_t log P_s``
averaged over every (teacher global crop, student crop) pair with different crops. The center is
an EMA of the teacher outputs' mean over the *global* batch: ``c ← m c + (1 − m) mean_B g_t``.
Defaults: ``τ_s = 0.1``, ``τ_t`` 0.04 → 0.07 (linear warmup), ``m = 0.9``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.losses.gather import all_reduce_sum_with_grad


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 → float32 (softmax over 65536 prototypes needs it); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Mean over pairs ``(t, s), t ≠ s`` of ``mean_b H(softmax((t − c)/τ_t), softmax(s/τ_s))``.

    ``student_out``: ``[n_crops * b, K]``, crop-major (globals first, then locals);
    ``teacher_out``: ``[n_global * b, K]`` for the global crops (no gradient flows into it);
    ``center``: ``[1, K]``. Pair ``(t, s)`` is skipped when both are the same global crop.
    """
    student = F.log_softmax(upcast(student_out) / student_temp, dim=-1).chunk(n_crops)  # V×[b, K]
    teacher_logits = (upcast(teacher_out).detach() - center) / teacher_temp
    teacher = F.softmax(teacher_logits, dim=-1).chunk(teacher_out.shape[0] // student[0].shape[0])
    total, terms = student_out.new_zeros((), dtype=student[0].dtype), 0
    for t, p_t in enumerate(teacher):  # [b, K]
        for s, log_p_s in enumerate(student):
            if s == t:
                continue
            total = total + torch.sum(-p_t * log_p_s, dim=-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def dino_center_update(
    center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """``m · c + (1 − m) · mean of teacher_out over the global batch`` (``[1, K]``).

    ``teacher_out``: ``[n, K]`` on this rank; the sum is all-reduced and divided by
    ``n × world_size`` (the paper's ``update_center``). A hidden sync when distributed.
    """
    batch_sum = upcast(teacher_out).sum(dim=0, keepdim=True).to(center.dtype)  # [1, K]
    batch_sum = all_reduce_sum_with_grad(batch_sum)  # no-op in one process
    count = teacher_out.shape[0] * world_size()
    return center * momentum + batch_sum / count * (1 - momentum)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warmup ``start → end`` over ``warmup_steps`` (``np.linspace`` as the paper's
    schedule: ``end`` is reached at step ``warmup_steps − 1``), then constant ``end``."""
    if step >= warmup_steps - 1:
        return end
    return start + (end - start) * step / (warmup_steps - 1)
