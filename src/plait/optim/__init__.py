"""Optimizers, learning-rate schedules and gradient clipping that reads each shard's placement."""

from plait.optim.clip import clip_grad_norm, global_grad_norm
from plait.optim.factories import adamw, lamb, lars
from plait.optim.lamb_optimizer import Lamb
from plait.optim.lars_optimizer import Lars
from plait.optim.layerwise import MeshNorms
from plait.optim.schedules import lars_warmup, lr_schedule, warmup_cosine, warmup_poly

__all__ = [
    "Lamb",
    "Lars",
    "MeshNorms",
    "adamw",
    "clip_grad_norm",
    "global_grad_norm",
    "lamb",
    "lars",
    "lars_warmup",
    "lr_schedule",
    "warmup_cosine",
    "warmup_poly",
]
