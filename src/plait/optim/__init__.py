"""Optimizers, learning-rate schedules and gradient clipping that reads each shard's placement."""

from plait.optim.clip import clip_grad_norm, global_grad_norm
from plait.optim.factories import adamw
from plait.optim.schedules import warmup_cosine

__all__ = ["adamw", "clip_grad_norm", "global_grad_norm", "warmup_cosine"]
