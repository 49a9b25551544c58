"""Bytes of model state a rank holds, counted from the live tensors.

The formula lives here, beside the substrate, so the engine can report its own
state (`Engine.state_bytes`) without depending on the training loop;
`plait.train.metrics`, which lists every measured quantity, re-exports it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _union_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes covered by the tensors' memory, each byte once (tied weights, views into one flat buffer)."""
    spans: dict[tuple[str, int | None], list[tuple[int, int]]] = {}
    for tensor in tensors:
        if tensor.device.type == "meta" or tensor.numel() == 0 or tensor.untyped_storage().nbytes() == 0:
            continue  # no memory behind it (ZeRO-3 releases full parameters' storage between uses)
        start = tensor.data_ptr()
        device_key = (tensor.device.type, tensor.device.index)
        spans.setdefault(device_key, []).append((start, start + tensor.numel() * tensor.element_size()))
    total = 0
    for intervals in spans.values():
        end = -1
        for lo, hi in sorted(intervals):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


def model_state_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, *, held: Iterable[torch.Tensor] = ()
) -> dict[str, int]:
    """Bytes of the model states this rank holds, counted from the live tensors.

    params    = bytes of the model's parameters and the optimizer's parameters
                (master copies or shards), each byte of memory once
    grads     = bytes of those parameters' .grad tensors (each grad's own
                numel * element_size, so a view into a flat bucket counts its slice)
    optimizer = bytes of the tensors in optimizer.state (Adam: exp_avg and
                exp_avg_sq, 8P in fp32, plus a 4-byte step per parameter)
    total     = params + grads + optimizer

    Memory shared by several tensors (tied weights, views into one flat
    buffer) is counted once. Call it after the first optimizer step, once
    the optimizer state exists.
    """
    params = [*model.parameters(), *held]  # held: parameter storage no parameter object reaches (ZeRO-3 shards)
    if optimizer is not None:
        params += [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    counts = {
        "params": _union_bytes(params),
        "grads": _union_bytes(grads),
        "optimizer": _union_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0,
    }
    counts["total"] = sum(counts.values())
    return counts
