"""The placement record: how a parameter a strand shards is laid out.

Clipping, optimizers and checkpoints read it; no strand imports another to
know a tensor's layout. A parameter without a record is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTRIBUTE = "_plait_placement"


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
    duplicate: bool = False  # a synchronised copy of a parameter held elsewhere (a tied head): norms skip it

    @property
    def sharded_axes(self) -> tuple[str, ...]:
        axes = (*(axis for axis, _ in self.dim_shards), *self.stage_axes)
        return (*axes, self.flat_range[0]) if self.flat_range else axes


def set_placement(tensor: torch.Tensor, placement: Placement) -> None:
    setattr(tensor, _ATTRIBUTE, placement)


def placement_of(tensor: torch.Tensor) -> Placement | None:
    """The tensor's placement record, or None if it is replicated."""
    return getattr(tensor, _ATTRIBUTE, None)
