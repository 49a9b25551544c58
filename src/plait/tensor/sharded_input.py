"""A column-parallel linear under sequence parallel that keeps its input's sequence shard for backward.

Forward multiplies the all-gathered input, as always; what it saves for the weight gradient is this
rank's sequence chunk (1/tp of the gathered copy), and backward all-gathers it again, as Megatron's
column-parallel layer does. The re-gather is started asynchronously and overlaps the input-gradient
matmul. Layers fed one gathered tensor (q, k and v; gate and up) share one `Regather`: the first of
them to run backward gathers, the others reuse that copy, and the last drops it.
"""

from __future__ import annotations

from typing import Any

import torch

from plait.distributed.comm import CommCounter
from plait.tensor.comm import ProcessGroup, start_all_gather


class Regather:
    """The all-gather of one sequence shard, rebuilt once in backward for every layer that used it."""

    def __init__(self, group: ProcessGroup, dim: int, counter: CommCounter | None) -> None:
        self.group, self.dim, self.counter = group, dim, counter
        self.num_users = 0
        self._pending: tuple[torch.Tensor, Any] | None = None  # (gathered buffer, dim first; async work)
        self._full: torch.Tensor | None = None

    def start(self, local: torch.Tensor) -> None:
        if self._full is not None or self._pending is not None:
            return
        self._pending = start_all_gather(local, self.group, self.dim, self.counter)

    def take(self) -> torch.Tensor:
        """The gathered tensor; the last user's call lets it go."""
        if self._pending is not None:
            out, work = self._pending
            work.wait()
            self._full, self._pending = out.movedim(0, self.dim), None
        full = self._full
        assert full is not None, "Regather.take before start"
        self.num_users -= 1
        if self.num_users <= 0:
            self._full = None
        return full


class _ShardSavedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, local, weight, bias, regather: Regather, transposed: bool):  # type: ignore[override]
        ctx.save_for_backward(local, weight)
        ctx.regather, ctx.transposed, ctx.has_bias = regather, transposed, bias is not None
        regather.num_users += 1
        out = full @ weight if transposed else torch.nn.functional.linear(full, weight)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        local, weight = ctx.saved_tensors
        ctx.regather.start(local)
        grad_full = grad @ weight.t() if ctx.transposed else grad @ weight  # overlaps the all-gather
        full = ctx.regather.take()
        grad_rows, full_rows = grad.reshape(-1, grad.shape[-1]), full.reshape(-1, full.shape[-1])
        grad_weight = full_rows.t() @ grad_rows if ctx.transposed else grad_rows.t() @ full_rows
        grad_bias = grad_rows.sum(0) if ctx.has_bias else None
        return grad_full, None, grad_weight, grad_bias, None, None


def linear_keeping_shard(
    full: torch.Tensor,
    local: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    regather: Regather,
    transposed: bool,
) -> torch.Tensor:
    """`full @ weight` (+ bias) where `full` is `local` all-gathered: backward re-gathers `local`
    instead of holding `full` from forward to backward."""
    return _ShardSavedLinear.apply(full, local, weight, bias, regather, transposed)
