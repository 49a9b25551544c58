"""Slicing a dense weight into this rank's shard, and the placement records that describe it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from plait.distributed.placement import Placement, set_placement


def local_partition(partition: Sequence[int] | None, total: int, size: int, *, what: str) -> tuple[int, ...]:
    """Each segment's size on one rank; the whole dim is one segment when partition is None."""
    segments = (total,) if partition is None else tuple(int(s) for s in partition)
    if sum(segments) != total:
        raise ValueError(f"{what}: partition {list(segments)} sums to {sum(segments)}, but the dim has {total}")
    for segment in segments:
        if segment % size != 0:
            raise ValueError(
                f"{what}: segment of size {segment} in {list(segments)} is not divisible by the tensor-parallel "
                f"size {size}; choose a tp that divides every segment (heads and kv heads must divide by tp)"
            )
    return tuple(segment // size for segment in segments)


def shard_segments(tensor: torch.Tensor, segments: Sequence[int], *, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of each segment along `dim`, concatenated: [seg0_local, seg1_local, ...]."""
    pieces = [segment.chunk(size, dim=dim)[rank] for segment in tensor.split(list(segments), dim=dim)]
    return torch.cat(pieces, dim=dim)


def rows_per_rank(num_rows: int, size: int, *, what: str) -> int:
    """Rows each rank holds when `num_rows` is padded up to a multiple of `size`."""
    per_rank = -(-num_rows // size)
    if per_rank * (size - 1) >= num_rows:
        raise ValueError(
            f"{what}: {num_rows} rows over {size} tensor-parallel ranks leaves the last rank without a row; "
            "use a smaller tp"
        )
    return per_rank


def padded_rows(weight: torch.Tensor, *, rank: int, per_rank: int) -> torch.Tensor:
    """Rows [rank * per_rank, (rank + 1) * per_rank) of `weight`, zero-padded past its end."""
    start = rank * per_rank
    local = weight.new_zeros((per_rank, *weight.shape[1:]))
    valid = min(per_rank, weight.shape[0] - start)
    local[:valid] = weight[start : start + valid]
    return local


def new_parameter(local: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter holding a copy of `local`, so the dense module can be freed."""
    return nn.Parameter(local.detach().clone(), requires_grad=like.requires_grad)


def mark_sharded(
    param: torch.Tensor, *, name: str, global_shape: Sequence[int], dim: int, segments: Sequence[int] = ()
) -> None:
    """`segments`: a fused tensor's segment sizes along `dim` (each split evenly), if it has several."""
    segments = tuple(segments) if len(segments) > 1 else ()
    placement = Placement(name=name, global_shape=tuple(global_shape), dim_shards=(("tp", dim),), segments=segments)
    set_placement(param, placement)


def mark_partial(param: torch.Tensor, *, name: str) -> None:
    set_placement(param, Placement(name=name, global_shape=tuple(param.shape), partial_grad_axes=("tp",)))
