"""Autograd-aware collectives over the tensor-parallel group (Megatron's mappings).

Each function is the identity when `group` is None (tp = 1), so a plan applied
with one tensor-parallel rank costs nothing. The forward and backward of each
pair are conjugate, which is what keeps gradients exact:

==============================  ====================  =====================
function                        forward               backward
==============================  ====================  =====================
copy_to_tp                      identity              all-reduce
reduce_from_tp                  all-reduce            identity
gather_sequence                 all-gather            reduce-scatter
reduce_scatter_sequence         reduce-scatter        all-gather
scatter_sequence                keep own chunk        all-gather
gather_sequence_no_reduce       all-gather            keep own chunk
==============================  ====================  =====================

Sequence tensors are batch-first, (batch, seq, hidden), so the sequence is dim 1.
Given a `counter`, each collective (forward or backward) is recorded on it
under the tp axis; the layers hold the counter the engine hands them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from plait.distributed.comm import CommCounter, all_gather_flat, reduce_scatter_flat

ProcessGroup = dist.ProcessGroup


def tp_rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """This rank's index in `group` and the group's size; (0, 1) when group is None."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_divisible(x: torch.Tensor, dim: int, size: int) -> None:
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"sequence parallel splits dim {dim} of a {tuple(x.shape)} tensor over {size} tensor-parallel "
            f"ranks, but {x.shape[dim]} is not divisible by {size}; pad the sequence length to a multiple "
            f"of {size} or turn sequence_parallel off"
        )


def _count(counter: CommCounter | None, op: str, buffer: torch.Tensor, group: ProcessGroup) -> None:
    if counter is not None:
        counter.record(op, buffer, group=group, axis="tp")


def _all_reduce(x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None) -> torch.Tensor:
    # A fresh buffer: the input may be saved for another node's backward.
    out = x.clone(memory_format=torch.contiguous_format)
    _count(counter, "all_reduce", out, group)
    dist.all_reduce(out, group=group)
    return out


def start_all_gather(
    x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None
) -> tuple[torch.Tensor, Any]:
    """Start gathering ``x`` along ``dim`` over ``group``: (the buffer, gathered dim first; its async work)."""
    size = dist.get_world_size(group)
    local = x.movedim(dim, 0).contiguous()
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    _count(counter, "all_gather", out, group)
    return out, all_gather_flat(out, local, group=group, async_op=True)


def _all_gather(x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None) -> torch.Tensor:
    out, work = start_all_gather(x, group, dim, counter)
    work.wait()
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None) -> torch.Tensor:
    size = dist.get_world_size(group)
    _check_divisible(x, dim, size)
    full = x.movedim(dim, 0).contiguous()
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
    _count(counter, "reduce_scatter", full, group)
    reduce_scatter_flat(out, full, group=group)
    return out.movedim(0, dim).contiguous()


def _own_chunk(x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None) -> torch.Tensor:
    rank, size = tp_rank_and_size(group)
    _check_divisible(x, dim, size)
    return x.chunk(size, dim=dim)[rank].clone(memory_format=torch.contiguous_format)


def _identity(x: torch.Tensor, group: ProcessGroup, dim: int, counter: CommCounter | None) -> torch.Tensor:
    return x.view_as(x)


Op = Callable[[torch.Tensor, ProcessGroup, int, "CommCounter | None"], torch.Tensor]


class _Conjugate(torch.autograd.Function):
    """`forward_op` on the way forward, `backward_op` on the gradient: one row of the table above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, dim: int, ops: tuple[Op, Op], counter: Any) -> torch.Tensor:
        forward_op, ctx.backward_op = ops
        ctx.group, ctx.dim, ctx.counter = group, dim, counter
        return forward_op(x, group, dim, counter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.backward_op(grad, ctx.group, ctx.dim, ctx.counter), None, None, None, None


def _apply(
    x: torch.Tensor, group: ProcessGroup | None, dim: int, ops: tuple[Op, Op], counter: CommCounter | None
) -> torch.Tensor:
    return x if group is None else _Conjugate.apply(x, group, dim % max(x.dim(), 1), ops, counter)


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None, *, counter: CommCounter | None = None) -> torch.Tensor:
    """Enter a column-parallel region: identity forward, all-reduce of the gradient backward."""
    return _apply(x, group, 0, (_identity, _all_reduce), counter)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None, *, counter: CommCounter | None = None) -> torch.Tensor:
    """Leave a row-parallel region: sum the partial outputs forward, identity backward."""
    return _apply(x, group, 0, (_all_reduce, _identity), counter)


def gather_sequence(
    x: torch.Tensor, group: ProcessGroup | None, dim: int = 1, *, counter: CommCounter | None = None
) -> torch.Tensor:
    """Enter a column-parallel region under sequence parallel: all-gather the sequence chunks
    forward, reduce-scatter the gradient backward (each rank's layer saw only its shard of weights)."""
    return _apply(x, group, dim, (_all_gather, _reduce_scatter), counter)


def reduce_scatter_sequence(
    x: torch.Tensor, group: ProcessGroup | None, dim: int = 1, *, counter: CommCounter | None = None
) -> torch.Tensor:
    """Leave a row-parallel region under sequence parallel: sum the partial outputs and keep
    this rank's sequence chunk forward, all-gather the gradient backward."""
    return _apply(x, group, dim, (_reduce_scatter, _all_gather), counter)


def scatter_sequence(
    x: torch.Tensor, group: ProcessGroup | None, dim: int = 1, *, counter: CommCounter | None = None
) -> torch.Tensor:
    """Keep this rank's sequence chunk of a replicated tensor forward, all-gather the gradient
    backward (e.g. position embeddings entering a sequence-parallel region)."""
    return _apply(x, group, dim, (_own_chunk, _all_gather), counter)


def gather_sequence_no_reduce(
    x: torch.Tensor, group: ProcessGroup | None, dim: int = 1, *, counter: CommCounter | None = None
) -> torch.Tensor:
    """All-gather forward, keep this rank's chunk of the gradient backward.

    Right only when what follows is replicated compute (every rank computes the
    same gradient for the gathered tensor), e.g. a dense LM head after the final
    norm under sequence parallel. A vocab-parallel head needs `gather_sequence`.
    """
    return _apply(x, group, dim, (_all_gather, _own_chunk), counter)


class SharedEntry:
    """Column-parallel layers fed the very same tensor (q, k and v; gate and up) enter the
    tensor-parallel region once: one sequence all-gather forward and one reduce-scatter (or,
    without sequence parallel, one all-reduce) of their summed input gradients backward,
    instead of one per layer. The entered tensor is held only while the tensor it came from
    lives (a weak reference's callback drops it)."""

    def __init__(self) -> None:
        self._last: tuple[Any, int, torch.Tensor, bool] | None = None  # (input ref, version, entered, sp)
        self.regather: Any = None  # under sequence parallel, the backward all-gather the entered tensor's users share

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copied or pickled model starts with nothing entered (weak references do not pickle)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._last, self.regather = None, None

    def _forget(self, source: Any) -> None:
        if self._last is not None and self._last[0] is source:
            self._last, self.regather = None, None

    def enter(
        self,
        x: torch.Tensor,
        group: ProcessGroup | None,
        *,
        sequence_parallel: bool,
        counter: CommCounter | None = None,
    ) -> torch.Tensor:
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and last[3] == sequence_parallel:
            return last[2]
        enter = gather_sequence if sequence_parallel else copy_to_tp
        out = enter(x, group, counter=counter)
        self._last = (weakref.ref(x, self._forget), x._version, out, sequence_parallel)
        self.regather = None  # a column layer keeping the input's shard sets a fresh one
        return out
