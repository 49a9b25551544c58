"""Gradient norms and clipping that read placement records.

Replicated gradients count once; a gradient sharded over mesh axes adds its
squares across those axes, so the norm is the one a single process sees.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from plait.config import AXES
from plait.distributed.comm import CommCounter
from plait.distributed.mesh import Mesh
from plait.distributed.placement import placement_of


def _is_sharded(mesh: Mesh) -> bool:
    plan = mesh.plan
    return mesh.world_size > 1 and (plan.zero > 0 or mesh.size("tp") > 1 or mesh.size("pp") > 1)


def global_grad_norm(
    params: Iterable[torch.nn.Parameter], *, mesh: Mesh, counter: CommCounter | None = None
) -> torch.Tensor:
    """The L2 norm of all gradients, as one process would compute it (0-dim).

    When every rank holds every gradient: per-tensor norms, then the norm of
    those, as torch's clip_grad_norm_ does (bit-identical to it). Otherwise
    each gradient's squares count once over the world: divided by the number of
    ranks holding a replica of it, summed over every rank in one all-reduce (so
    the collective never depends on which pieces a rank happens to hold).
    Synchronised duplicates (a tied head on the last pipeline stage) are skipped.
    The all-reduce is recorded on `counter` when given.
    """
    by_replicas: dict[int, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        placement = placement_of(param)
        if param.grad is None or (placement is not None and placement.duplicate):
            continue
        sharded = set(placement.sharded_axes) if placement else set()
        replicas = math.prod(mesh.size(axis) for axis in AXES if axis not in sharded)
        by_replicas[replicas].append(param.grad.detach())
    if not _is_sharded(mesh):
        grads = [g for group in by_replicas.values() for g in group]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)
    total = torch.zeros((), dtype=torch.float32)
    for replicas, grads in by_replicas.items():
        total = total.to(grads[0].device) + torch.stack(torch._foreach_norm(grads, 2)).float().pow(2).sum() / replicas
    if counter is not None:
        counter.record("all_reduce", total, group=dist.group.WORLD)
    dist.all_reduce(total)
    return total.sqrt()


def clip_grad_norm(
    params: list[torch.nn.Parameter], *, max_norm: float, mesh: Mesh, counter: CommCounter | None = None
) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params, mesh=mesh, counter=counter)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return norm
