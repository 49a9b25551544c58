"""Optimizer factories in the form boost() takes: params -> optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from plait.distributed.placement import placement_of


def is_matrix(param: torch.Tensor) -> bool:
    """Whether a parameter is a matrix (or higher), judged by its global shape under sharding."""
    placement = placement_of(param)
    return len(placement.global_shape if placement else param.shape) >= 2


def adamw(
    *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """AdamW that decays matrices only: biases, norm weights and other vectors are not decayed.

    Example: `plait.boost(model, optimizer=plait.optim.adamw(lr=3e-4, weight_decay=0.1), ...)`.
    """

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        groups = [
            {"params": [p for p in params if is_matrix(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
        ]
        # fused: one kernel per step over all tensors, the host step at memory bandwidth (offload needs it)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)

    return build
