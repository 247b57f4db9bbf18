"""Collectives that keep autograd intact, for losses over the global batch.

``gather_with_grad`` is what SimCLR's NT-Xent needs: every rank's loss depends on every rank's
embeddings, so the backward pass must sum the gradients that all ranks computed for this rank's
slice. Implemented with ``all_gather`` forward and ``all_reduce`` backward, which gloo (CPU) and
NCCL both support (``torch.distributed.nn`` uses reduce-scatter/all-to-all, absent on gloo).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum of every rank's d(loss_r)/d(gathered)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[b, ...]`` on each rank → ``[world * b, ...]`` in rank order, differentiable."""
    return _GatherWithGrad.apply(x) if _dist_ready() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``[b, ...]`` → ``[world * b, ...]`` without gradient (keys of a momentum encoder)."""
    if not _dist_ready():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (each rank's output depends on every rank's input)."""
    return _AllReduceSumWithGrad.apply(x) if _dist_ready() else x


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the gathered global batch."""
    return dist.get_rank() * local_batch if _dist_ready() else 0
