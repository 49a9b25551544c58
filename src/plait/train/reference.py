"""The parity oracle: one plain process training on the whole global batch.

No plait machinery is involved: plain forward, backward, torch's clipping
and the optimizer, so a plan's losses and weights can be checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def plain_loss(loss_fn: Callable[[Any, Batch], Any], outputs: Any, batch: Batch) -> torch.Tensor:
    loss = loss_fn(outputs, batch)
    if isinstance(loss, tuple):
        loss_sum, num_tokens = loss
        return loss_sum / num_tokens
    return loss


def train_reference(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    loss_fn: Callable[[Any, Batch], Any],
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Train `model` in place on each global batch in turn; return the loss of every step."""
    opt = optimizer(list(model.parameters()))
    scheduler = lr_scheduler(opt) if lr_scheduler else None
    losses = []
    for batch in batches:
        loss = plain_loss(loss_fn, model(**batch), batch)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
