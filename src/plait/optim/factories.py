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
        groups = _decay_groups(params, weight_decay=weight_decay)
        # fused: one kernel per step over all tensors, the host step at memory bandwidth (offload needs it)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)

    return build


def lamb(
    *,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    trust_clip: bool = False,
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """LAMB with matrices decayed and adapted; biases, norm weights and other vectors take the plain
    Adam step (no decay, no trust ratio), as the LAMB paper's BERT runs exclude them.

    Example: `plait.boost(model, optimizer=plait.optim.lamb(lr=2e-3, weight_decay=0.01), ...)`.
    """
    from plait.optim.lamb_optimizer import Lamb

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        groups = _decay_groups(params, weight_decay=weight_decay)
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_clip=trust_clip)

    return build


def lars(
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    trust_coeff: float = 0.001,
    trust_clip: bool = False,
    nesterov: bool = False,
    vector_lr_ratio: float = 1.0,
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """LARS with matrices decayed and adapted; biases, norm weights and other vectors take the plain
    momentum step (no decay, no local learning rate), as LARS's ImageNet runs exclude them, at
    ``lr * vector_lr_ratio`` (1: timm's and the paper's). An adapted matrix moves by about
    ``lr * trust_coeff`` of its norm per step, a vector by ``lr`` times its gradient: at LARS's
    large lr a ratio near trust_coeff keeps the vectors' steps on the matrices' scale (a ViT's
    zero-initialised patch-embedding bias otherwise outgrows the patch signal and training stalls).

    Example: `plait.boost(model, optimizer=plait.optim.lars(lr=1.0, weight_decay=5e-5), ...)`.
    """
    from plait.optim.lars_optimizer import Lars

    if vector_lr_ratio <= 0:
        raise ValueError(f"lars: vector_lr_ratio={vector_lr_ratio} must be positive, e.g. 1 (timm's) or trust_coeff")

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        groups = _decay_groups(params, weight_decay=weight_decay)
        for group in groups:
            if group["weight_decay"] == 0:
                group["lr"] = lr * vector_lr_ratio
        options = dict(momentum=momentum, trust_coeff=trust_coeff, trust_clip=trust_clip, nesterov=nesterov)
        return Lars(groups, lr=lr, weight_decay=weight_decay, **options)

    return build


def _decay_groups(params: Iterable[nn.Parameter], *, weight_decay: float) -> list[dict]:
    """Matrices with `weight_decay`, everything else without; empty groups left out."""
    params = list(params)
    groups = [
        {"params": [p for p in params if is_matrix(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
