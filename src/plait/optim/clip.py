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
from plait.distributed.placement import CARVED_FROM_DP, placement_of


def _is_sharded(mesh: Mesh) -> bool:
    plan = mesh.plan
    split = plan.zero > 0 or any(mesh.size(axis) > 1 for axis in ("tp", "pp", "ep"))
    return mesh.world_size > 1 and split


def num_replicas(sharded: set[str], *, mesh: Mesh) -> int:
    """Ranks holding the same piece of a tensor sharded over the `sharded` axes. Expert parallel
    carves ep x edp out of dp, and hybrid sharding zshard x zrep: a piece split over ep (experts),
    edp (their ZeRO shards) or zshard (hybrid ZeRO shards) has dp / that axis's size replicas along dp."""
    # cp is folded into the dp axis (its ranks hold weight replicas; plait.distributed.mesh)
    replicas = math.prod(mesh.size(axis) for axis in AXES if axis not in sharded and axis not in ("dp", "cp"))
    if "dp" in sharded:
        return replicas
    carved = math.prod(mesh.size(axis) for axis in CARVED_FROM_DP if axis in sharded)
    return replicas * mesh.size("dp") // carved


def norm_terms(params: Iterable[torch.nn.Parameter], *, mesh: Mesh) -> dict[int, list[torch.Tensor]]:
    """Each gradient's 2-norm, grouped by how many ranks hold a replica of it (see `global_grad_norm`).

    Terms of disjoint parameter sets can be merged (`merge_terms`) and finished once, which is how
    offloaded gradients, brought into memory a unit at a time, get the same norm.
    """
    by_replicas: dict[int, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        placement = placement_of(param)
        if param.grad is None or (placement is not None and placement.duplicate):
            continue
        sharded = set(placement.sharded_axes) if placement else set()
        replicas = num_replicas(sharded, mesh=mesh)
        by_replicas[replicas].append(param.grad.detach())
    return {replicas: list(torch._foreach_norm(grads, 2)) for replicas, grads in by_replicas.items()}


def merge_terms(into: dict[int, list[torch.Tensor]], terms: dict[int, list[torch.Tensor]]) -> None:
    for replicas, norms in terms.items():
        into.setdefault(replicas, []).extend(norms)


def finish_norm(
    terms: dict[int, list[torch.Tensor]], *, mesh: Mesh, counter: CommCounter | None = None
) -> torch.Tensor:
    """The global norm from `norm_terms` (one all-reduce when gradients are sharded)."""
    if not _is_sharded(mesh):
        norms = [n for group in terms.values() for n in group]
        return torch.linalg.vector_norm(torch.stack(norms), 2)
    total = torch.zeros((), dtype=torch.float32)
    for replicas, norms in terms.items():
        total = total.to(norms[0].device) + torch.stack(norms).float().pow(2).sum() / replicas
    if counter is not None:
        counter.record("all_reduce", total, group=dist.group.WORLD)
    dist.all_reduce(total)
    return total.sqrt()


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
    return finish_norm(norm_terms(params, mesh=mesh), mesh=mesh, counter=counter)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping multiplies every gradient by (at most 1)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_grad_norm(
    params: list[torch.nn.Parameter], *, max_norm: float, mesh: Mesh, counter: CommCounter | None = None
) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params, mesh=mesh, counter=counter)
    if max_norm > 0:
        scale = clip_coefficient(norm, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return norm
