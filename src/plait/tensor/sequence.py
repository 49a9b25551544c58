"""Sequence parallel outside the linear layers: norms, replicated inputs, partial gradients.

Between a row-parallel layer's reduce-scatter and the next column-parallel
layer's all-gather, activations are (batch, seq/tp, hidden): norms, dropout and
residual adds run unchanged on this rank's tokens. Their parameters stay
replicated, but each rank's gradient covers only its own tokens, so it must be
summed over tp before the optimizer step; the placement record says so with
`partial_grad_axes=("tp",)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from plait.distributed.comm import CommCounter
from plait.distributed.placement import Placement, placement_of, set_placement
from plait.tensor.comm import ProcessGroup, scatter_sequence


def mark_sequence_parallel(module: nn.Module, *, name_prefix: str) -> None:
    """Record that `module`'s parameters get partial gradients over tp (a norm under sequence parallel).

    `name_prefix` is the module's name in the model, e.g. "blocks.0.norm1".
    """
    for name, param in module.named_parameters():
        existing = placement_of(param)
        if existing is not None:
            axes = tuple(dict.fromkeys((*existing.partial_grad_axes, "tp")))
            set_placement(param, replace(existing, partial_grad_axes=axes))
            continue
        full_name = f"{name_prefix}.{name}" if name_prefix else name
        set_placement(param, Placement(name=full_name, global_shape=tuple(param.shape), partial_grad_axes=("tp",)))


def partial_over_tp(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters whose placement marks their gradients as partial over tp."""
    return [p for p in params if (record := placement_of(p)) is not None and "tp" in record.partial_grad_axes]


def allreduce_partial_grads(
    params: Iterable[torch.Tensor], *, group: ProcessGroup | None, counter: CommCounter | None = None
) -> None:
    """Sum the gradients of the partial-over-tp parameters among `params` over `group`.

    A plain reference (one collective per parameter); a data-parallel strand
    that buckets gradients can do the same from the placement records.
    """
    if group is None:
        return
    for param in partial_over_tp(params):
        if param.grad is not None:
            if counter is not None:
                counter.record("all_reduce", param.grad, group=group, axis="tp")
            dist.all_reduce(param.grad, group=group)


class SequenceScatter:
    """The forward hook `scatter_output_sequence` registers; kept on the module as `sequence_scatter`
    so the engine can hand it a counter (`counter`) like the parallel layers."""

    def __init__(self, group: ProcessGroup | None, *, dim: int) -> None:
        self.group = group
        self.dim = dim
        self.counter: CommCounter | None = None

    def __call__(self, module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return scatter_sequence(output, self.group, dim=self.dim, counter=self.counter)


def scatter_output_sequence(module: nn.Module, *, group: ProcessGroup | None, dim: int = 1) -> RemovableHandle:
    """Make `module` return only this rank's sequence chunk of its (replicated) output.

    For inputs that join the sequence-parallel stream from outside it, such as
    learned position embeddings added to a `VocabParallelEmbedding`'s
    sequence-parallel output. A forward hook, so parameter names do not change.
    The gradient is all-gathered on the way back, so the module's parameter
    gradients are complete, not partial. `dim` is the sequence dim of the
    module's output: 0 for a (seq, dim) position embedding.
    """
    module.sequence_scatter = SequenceScatter(group, dim=dim)
    return module.register_forward_hook(module.sequence_scatter)
