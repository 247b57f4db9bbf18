"""Where each parameter's elements sit in DeepSpeed ZeRO's flat fp32 partitions.

Used twice: to give LARS/LAMB a :class:`ShardLayout` (which parameter each stretch of a flat
partition belongs to), and to re-partition a ZeRO checkpoint for another number of processes.

Stages 1/2 (``DeepSpeedZeroOptimizer``, ``round_robin_gradients`` off, no
``parameter_alignment``): each param group is one flat buffer, the group's parameters one after
another, padded at the end to a multiple of ``2 · world``; rank ``r`` holds the ``r``-th of
``world`` equal partitions. Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): each parameter of
``n`` elements is split in ``ceil(n / world)``-element slices (rank ``r`` holds elements
``[r·s, (r+1)·s)``, the tail padded); a sub-group's slices are concatenated into one flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.optim.trust import ShardLayout


@dataclass(frozen=True)
class Piece:
    """Elements ``[param_start, param_start + length)`` of the flattened parameter ``index``
    (its position in the flat's parameter list) at ``[flat_start, flat_start + length)``."""

    index: int
    param_start: int
    flat_start: int
    length: int


PiecesFn = Callable[[Sequence[int], int, int], tuple[list[Piece], int]]


def stage12_pieces(numels: Sequence[int], world: int, rank: int) -> tuple[list[Piece], int]:
    """Pieces of rank ``rank``'s partition of a stage 1/2 flat group, and its size."""
    align = 2 * world  # DeepSpeed's nccl_start_alignment_factor (2) × world
    size = math.ceil(sum(numels) / align) * align // world
    start, end = rank * size, (rank + 1) * size
    pieces, offset = [], 0
    for index, n in enumerate(numels):
        b, e = max(offset, start), min(offset + n, end)
        if b < e:
            pieces.append(Piece(index, b - offset, b - start, e - b))
        offset += n
    return pieces, size


def stage3_pieces(numels: Sequence[int], world: int, rank: int) -> tuple[list[Piece], int]:
    """Pieces of rank ``rank``'s flat of a stage 3 sub-group, and its size."""
    pieces, offset = [], 0
    for index, n in enumerate(numels):
        slice_len = math.ceil(n / world)
        real = max(0, min(n - rank * slice_len, slice_len))
        if real:
            pieces.append(Piece(index, rank * slice_len, offset, real))
        offset += slice_len
    return pieces, offset


def flat_groups(zero_optimizer: Any, stage: int) -> tuple[list[list[torch.nn.Parameter]], list]:
    """(parameters of each flat partition in order, this rank's fp32 flat tensors)."""
    if stage < 3:
        if any(any(p) for p in zero_optimizer.round_robin_bit16_padding):
            raise ValueError(
                "engine.deepspeed_config: zero_optimization.parameter_alignment pads between "
                "parameters; the ZeRO shard layout supports only the default (off)"
            )
        return (
            zero_optimizer.round_robin_bit16_groups,
            zero_optimizer.single_partition_of_fp32_groups,
        )
    return zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat


def pieces_fn(stage: int) -> PiecesFn:
    return stage12_pieces if stage < 3 else stage3_pieces


def zero_shard_layout(zero_optimizer: Any, stage: int) -> ShardLayout:
    """The LARS/LAMB :class:`ShardLayout` of this rank's flat partitions; padding gets the spare
    key ``num_params`` (its trust ratio is never used: padding is zero and stays zero)."""
    groups, flats = flat_groups(zero_optimizer, stage)
    group = zero_optimizer.dp_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    keys = {id(p): k for k, p in enumerate(p for params in groups for p in params)}
    pad = len(keys)
    layout = ShardLayout(num_params=pad + 1, group=group)
    for params, flat in zip(groups, flats, strict=True):
        pieces, size = pieces_fn(stage)(
            [p.ds_numel if stage == 3 else p.numel() for p in params], world, rank
        )
        if size != flat.numel():
            raise RuntimeError(f"ZeRO flat partition has {flat.numel()} elements, expected {size}")
        segments, pos = [], 0
        for piece in pieces:
            segments += [
                (pad, piece.flat_start - pos),
                (keys[id(params[piece.index])], piece.length),
            ]
            pos = piece.flat_start + piece.length
        segments.append((pad, size - pos))
        layout.segments[id(flat)] = _merge(segments)
    return layout


def _merge(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop empty segments and join neighbours with the same key."""
    merged: list[tuple[int, int]] = []
    for key, n in segments:
        if n <= 0:
            continue
        if merged and merged[-1][0] == key:
            merged[-1] = (key, merged[-1][1] + n)
        else:
            merged.append((key, n))
    return merged


def reshard(
    saved: Sequence[torch.Tensor],
    numels: Sequence[int],
    stage: int,
    saved_world: int,
    world: int,
    rank: int,
) -> torch.Tensor:
    """This rank's flat partition (``world`` processes) of one flat group, from the flats of
    every rank of a ``saved_world``-process checkpoint (``saved[r]``; padding may be missing)."""
    fn = pieces_fn(stage)
    full = torch.zeros(sum(numels), dtype=saved[0].dtype)  # the group's parameters, unpadded
    starts = [0]
    for n in numels[:-1]:
        starts.append(starts[-1] + n)
    for r, flat in enumerate(saved):
        for piece in fn(numels, saved_world, r)[0]:
            dst = starts[piece.index] + piece.param_start
            full[dst : dst + piece.length] = flat[
                piece.flat_start : piece.flat_start + piece.length
            ]
    pieces, size = fn(numels, world, rank)
    out = torch.zeros(size, dtype=full.dtype)
    for piece in pieces:
        src = starts[piece.index] + piece.param_start
        out[piece.flat_start : piece.flat_start + piece.length] = full[src : src + piece.length]
    return out


def saved_partition_size(numels: Sequence[int], stage: int, world: int, rank: int) -> int:
    return pieces_fn(stage)(numels, world, rank)[1]


def load_resharded(
    zero: Any, base_optimizer: torch.optim.Optimizer, stage: int, zero_dir: Path, saved_world: int
) -> None:
    """Another world size: DeepSpeed 0.19.8 refuses (its universal-checkpoint converter
    knows only Adam's state keys), so rebuild each parameter's fp32 weights and optimizer
    state from every saved rank's flat partitions and cut this rank's partition again.
    Exact: the values are copied, not recomputed. Buffers and frozen parameters come from
    ``model_rest``. ``zero``: DeepSpeed's ZeRO optimizer; ``base_optimizer``: ours inside it."""
    from deepspeed.checkpoint import constants as C

    groups, flats = flat_groups(zero, stage)
    numels = [[p.ds_numel if stage == 3 else p.numel() for p in g] for g in groups]
    saved = [
        torch.load(
            zero_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            map_location="cpu",
            weights_only=False,  # DeepSpeed pickles its loss scaler
            mmap=True,
        )[C.OPTIMIZER_STATE_DICT]
        for r in range(saved_world)
    ]
    fp32_key = C.SINGLE_PARTITION_OF_FP32_GROUPS if stage < 3 else C.FP32_FLAT_GROUPS
    optim_key = C.BASE_OPTIMIZER_STATE if stage < 3 else C.OPTIMIZER_STATE_DICT
    if len(saved[0][fp32_key]) != len(flats):
        raise ValueError(
            f"{zero_dir}: {len(saved[0][fp32_key])} ZeRO flat groups saved, this run has "
            f"{len(flats)} (another optimizer grouping or zero_optimization.sub_group_size)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()

    def cut(tensors: list[torch.Tensor], j: int) -> torch.Tensor:
        return reshard(tensors, numels[j], stage, saved_world, world, rank)

    optim_states = [sd[optim_key] for sd in saved]
    new_state: dict[int, dict[str, Any]] = {}
    for j, flat in enumerate(flats):
        flat.data.copy_(cut([sd[fp32_key][j] for sd in saved], j))
        sizes = [saved_partition_size(numels[j], stage, saved_world, r) for r in range(saved_world)]
        entry = {}
        for key, value in optim_states[0]["state"].get(j, {}).items():
            values = [s["state"][j][key] for s in optim_states]
            partitioned = all(
                torch.is_tensor(v) and v.dim() == 1 and v.numel() == n
                for v, n in zip(values, sizes, strict=True)
            )
            entry[key] = cut(values, j) if partitioned else value
        if entry:
            new_state[j] = entry
    optim_sd = {"state": new_state, "param_groups": optim_states[0]["param_groups"]}
    if stage < 3:
        base_optimizer.load_state_dict(optim_sd)
        zero.update_lp_params()  # fp32 partitions → the module's parameters (all-gather)
    else:
        zero._set_fp32_optimizer_param_groups()
        base_optimizer.load_state_dict(optim_sd)
        zero._clear_fp32_optimizer_param_groups()
        for j in range(len(flats)):
            zero._reassign_or_swap_out_partitioned_parameters(j)
        if zero.persistent_parameters:  # kept whole on every rank: gather them again
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
