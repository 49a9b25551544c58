"""Gradients a rank holds only part of, summed over the axes that split them."""

from __future__ import annotations

import torch
from torch import nn

from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.mesh import Mesh
from plait.distributed.placement import placement_of


def reduce_partial_grads(params: list[nn.Parameter], *, mesh: Mesh, counter: CommCounter) -> bool:
    """Sum over their axes the gradients each rank holds only part of (sequence-parallel norms);
    True when there were any."""
    by_axes: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for param in params:
        placement = placement_of(param)
        if placement is not None and placement.partial_grad_axes and param.grad is not None:
            by_axes.setdefault(placement.partial_grad_axes, []).append(param.grad)
    for axes, grads in by_axes.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        for axis in axes:
            all_reduce(flat, group=mesh.group(axis), counter=counter)
        torch._foreach_copy_(
            grads, [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        )
    return bool(by_axes)
