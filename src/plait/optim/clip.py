"""Gradient norms and clipping that read placement records.

Replicated gradients count once; a gradient sharded over mesh axes adds its
squares across those axes, so the norm is the one a single process sees.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from plait.dist.mesh import Mesh
from plait.dist.placement import placement_of


def global_grad_norm(params: Iterable[torch.nn.Parameter], *, mesh: Mesh) -> torch.Tensor:
    """The L2 norm of all gradients, as one process would compute it (0-dim).

    Per-tensor norms first, then the norm of those, as torch's clip_grad_norm_
    does: with replicated gradients the result is bit-identical to it.
    """
    grads_by_axes: dict[tuple[str, ...], list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:
            placement = placement_of(param)
            grads_by_axes[placement.sharded_axes if placement else ()].append(param.grad.detach())
    partials = []
    for axes, grads in sorted(grads_by_axes.items()):
        partial = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)
        if not axes:
            partials.append(partial)
            continue
        squared = partial.pow(2)
        for axis in axes:
            group = mesh.group(axis)
            if group is not None:
                dist.all_reduce(squared, group=group)
        partials.append(squared.sqrt())
    if len(partials) == 1:
        return partials[0]
    return torch.linalg.vector_norm(torch.stack(partials), 2)


def clip_grad_norm(params: list[torch.nn.Parameter], *, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params, mesh=mesh)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return norm
