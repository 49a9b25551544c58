"""The optimizer a run's [train] section names, as the factory plait.boost takes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from plait.config import TrainConfig
from plait.optim import adamw, lamb, lars


def optimizer_from_config(train: TrainConfig) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """train.optimizer: AdamW (betas (0.9, beta2), eps), LAMB (the same moments) or LARS (momentum);
    each decays and (LAMB/LARS) adapts matrices only, with train.weight_decay and train.lr (LARS's vectors
    at train.lr x train.vector_lr_ratio)."""
    if train.optimizer == "lamb":
        return lamb(lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, train.beta2), eps=train.eps)
    if train.optimizer == "lars":
        return lars(
            lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, vector_lr_ratio=train.vector_lr_ratio
        )
    return adamw(lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, train.beta2), eps=train.eps)
