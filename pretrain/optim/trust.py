"""Layer-wise trust ratios (LARS, LAMB) from whole-parameter norms, whatever the sharding.

A trust ratio ``η · ‖w‖ / ‖u‖`` needs the norms of the *whole* parameter ``w`` and its update
``u``. Sharded engines split both: FSDP2 keeps a ``Shard(0)`` slice of each parameter per rank
(a DTensor), DeepSpeed ZeRO hands the optimizer flat buffers that concatenate slices of many
parameters. A :class:`ShardLayout` says, for each tensor the optimizer steps, which parameter
each stretch of it belongs to; :func:`trust_scales` sums squared norms per stretch, adds them up
per parameter across ranks (one all-reduce per parameter group), and returns the scale for each
tensor (a scalar, or one value per element for a flat buffer). Unsharded: no communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard; else ``t``), sharing storage."""
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class ShardLayout:
    """``segments[id(t)] = [(param_key, numel), ...]``: tensor ``t`` (flattened) is, in order,
    a stretch of ``numel`` elements of parameter ``param_key`` (``0 <= key < num_params``),
    then the next. Stretches of one key on several ranks of ``group`` make one parameter."""

    num_params: int
    group: dist.ProcessGroup | None = None
    segments: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def for_dtensors(cls, params: list[torch.Tensor]) -> ShardLayout:
        """FSDP2: each parameter is one DTensor, its local shard one stretch."""
        layout = cls(num_params=len(params))
        for key, p in enumerate(params):
            layout.segments[id(p)] = [(key, local(p).numel())]
            if isinstance(p, DTensor) and layout.group is None:
                layout.group = p.device_mesh.get_group()
        return layout


def trust_ratio(p: torch.Tensor, update: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """``η · ‖w‖ / ‖u‖``, or 1 when either norm is 0 (LARS with η = 0.001, LAMB with η = 1)."""
    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
    return _ratio(w_norm, u_norm, eta)


def _ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, eta: float) -> torch.Tensor:
    ratio = eta * w_norm / u_norm
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def trust_scales(
    tensors: list[torch.Tensor],
    weights: list[torch.Tensor],
    updates: list[torch.Tensor],
    eta: float,
    layout: ShardLayout | None,
) -> list[torch.Tensor]:
    """Scale for each of ``updates`` (local tensors; ``weights`` the matching local weights,
    ``tensors`` the optimizer's own parameter objects that key ``layout``)."""
    if layout is None:
        return [trust_ratio(w, u, eta) for w, u in zip(weights, updates, strict=True)]
    if not updates:
        return []
    device = updates[0].device
    acc = torch.promote_types(updates[0].dtype, torch.float32)  # bf16 sums lose too much
    sq = torch.zeros(2, layout.num_params, dtype=acc, device=device)  # [2, P]
    for t, w, u in zip(tensors, weights, updates, strict=True):
        keys, lengths = _segments(layout, t, device)
        sq[0].index_add_(0, keys, _segment_sq(w, lengths))
        sq[1].index_add_(0, keys, _segment_sq(u, lengths))
    if layout.group is not None and dist.get_world_size(layout.group) > 1:
        dist.all_reduce(sq, group=layout.group)
    ratios = _ratio(sq[0].sqrt(), sq[1].sqrt(), eta)  # [P]
    scales = []
    for t, u in zip(tensors, updates, strict=True):
        keys, lengths = _segments(layout, t, device)
        if len(lengths) == 1:
            scales.append(ratios[keys[0]].to(u.dtype))
        else:
            per_elem = torch.repeat_interleave(ratios[keys], lengths, output_size=u.numel())
            scales.append(per_elem.view_as(u).to(u.dtype))
    return scales


def _segments(
    layout: ShardLayout, t: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    segs = layout.segments[id(t)]
    keys = torch.tensor([k for k, _ in segs], dtype=torch.long, device=device)
    lengths = torch.tensor([n for _, n in segs], dtype=torch.long, device=device)
    return keys, lengths


def _segment_sq(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each consecutive stretch of ``x.flatten()`` (``[len(lengths)]``)."""
    flat = x.reshape(-1).to(torch.promote_types(x.dtype, torch.float32))
    if len(lengths) == 1:
        return flat.pow(2).sum().reshape(1)
    return torch.segment_reduce(flat.pow(2), "sum", lengths=lengths)
