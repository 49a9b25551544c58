"""The placement record: how a parameter a strand shards is laid out.

Clipping, optimizers and checkpoints read it; no strand imports another to
know a tensor's layout. A parameter without a record is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTRIBUTE = "_plait_placement"
# Axes that split each dp group into groups of its ranks (see mesh.py): expert parallel's ep and edp,
# hybrid sharding's zshard. A piece sliced over one has dp / its size replicas along dp.
CARVED_FROM_DP = ("ep", "edp", "zshard")


@dataclass(frozen=True)
class Placement:
    """`dim_shards`: (axis, dim) pairs, the tensor split evenly along dim over the axis.
    `flat_range`: (axis, start, end) when the local tensor is a range of the
    flattened global tensor (ZeRO). `partial_grad_axes`: axes over which the
    parameter is replicated but each rank computes only part of its gradient
    (sequence parallel norms), so gradients must be summed over them.
    `segments`: a fused projection (q, k, v) whose local shard is each
    segment's slice, concatenated. A flat_range applies to the local tensor
    after the dim shards.
    `name` is the parameter's name in the model."""

    name: str
    global_shape: tuple[int, ...]
    dim_shards: tuple[tuple[str, int], ...] = ()
    flat_range: tuple[str, int, int] | None = None
    partial_grad_axes: tuple[str, ...] = ()
    segments: tuple[int, ...] = ()  # a fused tensor's segment sizes along its sharded dim, each split evenly
    stage_axes: tuple[str, ...] = ()  # ranks along these axes hold different parameters (pipeline stages)
    tied_to: str = ""  # a synchronised copy of this parameter (a tied head): norms and checkpoints skip it

    @property
    def duplicate(self) -> bool:
        return bool(self.tied_to)

    @property
    def sharded_axes(self) -> tuple[str, ...]:
        axes = (*(axis for axis, _ in self.dim_shards), *self.stage_axes)
        return (*axes, self.flat_range[0]) if self.flat_range else axes


def set_placement(tensor: torch.Tensor, placement: Placement) -> None:
    setattr(tensor, _ATTRIBUTE, placement)


def placement_of(tensor: torch.Tensor) -> Placement | None:
    """The tensor's placement record, or None if it is replicated."""
    return getattr(tensor, _ATTRIBUTE, None)


def tp_dim(placement: Placement | None) -> int | None:
    """The dim a placement splits over tensor parallel, or None."""
    if placement is None:
        return None
    dims = [dim for axis, dim in placement.dim_shards if axis == "tp"]
    return dims[0] if dims else None


def shard_along(whole: torch.Tensor, placement: Placement, *, rank: int, size: int, fill: float = 0) -> torch.Tensor:
    """This rank's tp slice of a whole tensor: each segment of a fused tensor split evenly, or the
    dim padded with `fill` up to a multiple of `size` (vocabulary rows) and split evenly."""
    dim = tp_dim(placement)
    if dim is None or size == 1:
        return whole
    if placement.segments:
        pieces = [seg.chunk(size, dim=dim)[rank] for seg in whole.split(list(placement.segments), dim=dim)]
        return torch.cat(pieces, dim=dim)
    rows = whole.shape[dim]
    per_rank = -(-rows // size)
    padding = per_rank * size - rows
    if padding:
        pad_shape = list(whole.shape)
        pad_shape[dim] = padding
        whole = torch.cat([whole, whole.new_full(pad_shape, fill)], dim=dim)
    return whole.narrow(dim, rank * per_rank, per_rank)
