"""Learning-rate schedules as torch LambdaLR factories."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, *, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine down to min_ratio*lr at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float = 0.1) -> LambdaLR:
    """Warmup then cosine decay, stepped once per optimizer step.

    Example: `lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=100, total=10_000)`.
    """
    if total < 1 or warmup < 0:
        raise ValueError(f"warmup_cosine needs total >= 1 and warmup >= 0, got total={total}, warmup={warmup}")
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup=warmup, total=total, min_ratio=min_ratio))
