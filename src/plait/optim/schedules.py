"""Learning-rate schedules as torch LambdaLR factories, stepped once per optimizer step.

- `warmup_cosine`: linear warmup, then cosine down to min_ratio*lr (GPT-style LM training).
- `warmup_poly`: linear warmup, then polynomial decay (1 - progress)**power down to end_ratio*lr;
  power 1 is BERT's and the LAMB paper's recipe (linear decay to 0).
- `lars_warmup`: LARS's recipe (You et al. 2017, Goyal et al.'s gradual warmup): linear warmup,
  then polynomial decay of power 2 to end_ratio*lr.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "poly", "lars")  # the names train.schedule accepts
LARS_POWER = 2.0


def warmup_cosine_factor(step: int, *, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then cosine down to min_ratio*lr at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_poly_factor(step: int, *, warmup: int, total: int, power: float = 1.0, end_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over `warmup` steps, then end_ratio + (1 - end_ratio) *
    (1 - progress)**power, progress running from 0 at `warmup` to 1 at `total` (held there after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end_ratio + (1 - end_ratio) * (1 - progress) ** power


def _check(name: str, *, warmup: int, total: int, ratio: float) -> None:
    if total < 1 or warmup < 0:
        raise ValueError(f"{name} needs total >= 1 and warmup >= 0, got total={total}, warmup={warmup}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"{name}: the final lr ratio {ratio} must lie in [0, 1], e.g. 0 (decay to zero)")


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, min_ratio: float = 0.1) -> LambdaLR:
    """Warmup then cosine decay.

    Example: `lr_scheduler=lambda opt: plait.optim.warmup_cosine(opt, warmup=100, total=10_000)`.
    """
    _check("warmup_cosine", warmup=warmup, total=total, ratio=min_ratio)
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup=warmup, total=total, min_ratio=min_ratio))


def warmup_poly(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, power: float = 1.0, end_ratio: float = 0.0
) -> LambdaLR:
    """Warmup then polynomial decay (LAMB/BERT: power 1, to zero).

    Example: `lr_scheduler=lambda opt: plait.optim.warmup_poly(opt, warmup=500, total=5_000)`.
    """
    _check("warmup_poly", warmup=warmup, total=total, ratio=end_ratio)
    if power <= 0:
        raise ValueError(f"warmup_poly: power={power} must be positive, e.g. 1 (linear) or 2 (LARS)")
    return LambdaLR(
        optimizer,
        lambda step: warmup_poly_factor(step, warmup=warmup, total=total, power=power, end_ratio=end_ratio),
    )


def lars_warmup(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, end_ratio: float = 0.0) -> LambdaLR:
    """LARS's schedule: linear warmup, then polynomial decay of power 2.

    Example: `lr_scheduler=lambda opt: plait.optim.lars_warmup(opt, warmup=5 * steps_per_epoch, total=steps)`.
    """
    return warmup_poly(optimizer, warmup=warmup, total=total, power=LARS_POWER, end_ratio=end_ratio)


def lr_schedule(optimizer: torch.optim.Optimizer, *, name: str, warmup: int, total: int, min_ratio: float) -> LambdaLR:
    """The schedule `train.schedule` names ("cosine", "poly" or "lars"), ending at min_ratio*lr."""
    if name == "cosine":
        return warmup_cosine(optimizer, warmup=warmup, total=total, min_ratio=min_ratio)
    if name == "poly":
        return warmup_poly(optimizer, warmup=warmup, total=total, end_ratio=min_ratio)
    if name == "lars":
        return lars_warmup(optimizer, warmup=warmup, total=total, end_ratio=min_ratio)
    raise ValueError(f"schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
