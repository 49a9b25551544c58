"""Column- and row-parallel linear layers, built from an existing dense layer.

A plan swaps a model's submodule for one of these in place; the new module
holds this rank's slice of the dense weights (so every plan starts from the
same initial weights) and each sharded parameter carries a placement record
named after the dense parameter. `from_dense` also takes GPT-2's `Conv1D`
(weight laid out (in, out)), keeping that layout so the records match the
dense parameter's shape.

    attn.qkv = ColumnParallelLinear.from_dense(attn.qkv, group=tp, name="blocks.0.attn.qkv",
                                               partition=[q_size, kv_size, kv_size])
    attn.out = RowParallelLinear.from_dense(attn.out, group=tp, name="blocks.0.attn.out")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from plait.distributed.comm import CommCounter
from plait.tensor._shard import local_partition, mark_partial, mark_sharded, new_parameter, shard_segments
from plait.tensor.comm import (
    ProcessGroup,
    SharedEntry,
    gather_sequence,
    gather_sequence_no_reduce,
    reduce_from_tp,
    reduce_scatter_sequence,
    tp_rank_and_size,
)
from plait.tensor.sharded_input import Regather, linear_keeping_shard


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    out = x @ weight  # Conv1D layout: weight is (in, out)
    return out if bias is None else out + bias


def _set_bias(module: nn.Module, bias: nn.Parameter | None) -> None:
    if bias is None:
        module.register_parameter("bias", None)
    else:
        module.bias = bias


class _ParallelLinear(nn.Module):
    """What both layers hold: this rank's weight and bias, the group, and the weight's layout."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        *,
        group: ProcessGroup | None,
        sequence_parallel: bool = False,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight
        _set_bias(self, bias)
        self.group = group
        self.counter: CommCounter | None = None  # set by `count_collectives` once the engine has one
        self.sequence_parallel = sequence_parallel
        self.transposed = transposed
        self.in_features, self.out_features = weight.shape if transposed else weight.shape[::-1]


class ColumnParallelLinear(_ParallelLinear):
    """A linear layer whose output features are split over the tensor-parallel group.

    The output is this rank's features, [seg0_local, seg1_local, ...] when the
    dense output is a concatenation of segments (fused q/k/v, gate/up), unless
    `gather_output` is set. Under sequence parallel the input is this rank's
    sequence chunk (batch, seq/tp, in), or of tokens (tokens/tp, in), and is
    all-gathered first.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        *,
        group: ProcessGroup | None,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        local_partition: Sequence[int] = (),
        transposed: bool = False,
        entry: SharedEntry | None = None,
    ) -> None:
        super().__init__(weight, bias, group=group, sequence_parallel=sequence_parallel, transposed=transposed)
        self.entry = entry or SharedEntry()
        self.gather_output = gather_output
        self.local_partition = tuple(local_partition) or (self.out_features,)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        group: ProcessGroup | None,
        name: str,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        partition: Sequence[int] | None = None,
        entry: SharedEntry | None = None,
    ) -> ColumnParallelLinear:
        """This rank's share of `linear` (an nn.Linear, weight (out, in), or GPT-2's Conv1D, weight
        (in, out), kept in that layout); `name` is its name in the model.

        `partition` lists the sizes of the segments the output concatenates
        (e.g. [q, k, v]); each segment is split separately. Layers given one `entry` enter the
        tensor-parallel region once when they are fed the same tensor.
        """
        transposed = is_transposed(linear)
        out_dim = 1 if transposed else 0
        weight, bias, segments = _column_shards(linear, out_dim=out_dim, group=group, name=name, partition=partition)
        options = {"sequence_parallel": sequence_parallel, "gather_output": gather_output, "transposed": transposed}
        return cls(weight, bias, group=group, local_partition=segments, entry=entry, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and x.dim() == 2:  # (tokens, in): (batch, seq) flattened first (OPT's MLP)
            full = gather_sequence(x, self.group, dim=0, counter=self.counter)
        else:
            full = self.entry.enter(x, self.group, sequence_parallel=self.sequence_parallel, counter=self.counter)
        if self._keeps_shard():
            out = linear_keeping_shard(
                full, x, self.weight, self.bias, regather=self._regather(x), transposed=self.transposed
            )
        else:
            out = _project(full, self.weight, self.bias, transposed=self.transposed)
        return self._gather(out) if self.gather_output else out

    def _keeps_shard(self) -> bool:
        # Under sequence parallel the weight gradient needs the gathered input: keep this rank's chunk
        # and gather it again in backward rather than hold the whole copy (Megatron's trade).
        return (
            self.sequence_parallel and self.group is not None and torch.is_grad_enabled() and self.weight.requires_grad
        )

    def _regather(self, x: torch.Tensor) -> Regather:
        if x.dim() == 2:
            return Regather(self.group, 0, self.counter)
        if self.entry.regather is None:  # the first layer fed this entered tensor; the others share it
            self.entry.regather = Regather(self.group, 1, self.counter)
        return self.entry.regather

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        _, size = tp_rank_and_size(self.group)
        gathered = gather_sequence_no_reduce(out, self.group, dim=-1, counter=self.counter)  # (..., tp * out_local)
        if len(self.local_partition) == 1:
            return gathered
        by_rank = gathered.unflatten(-1, (size, self.out_features))
        segments = by_rank.split(list(self.local_partition), dim=-1)  # each (..., tp, seg_local)
        return torch.cat([segment.flatten(-2) for segment in segments], dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (local), "
            f"partition={list(self.local_partition)}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}, gather_output={self.gather_output}"
        )


def is_transposed(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2) is a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D"


def _column_shards(
    dense: nn.Module, *, out_dim: int, group: ProcessGroup | None, name: str, partition: Sequence[int] | None
) -> tuple[nn.Parameter, nn.Parameter | None, tuple[int, ...]]:
    rank, size = tp_rank_and_size(group)
    weight, bias = dense.weight, dense.bias
    segments = tuple(partition) if partition is not None else (weight.shape[out_dim],)
    local = local_partition(segments, weight.shape[out_dim], size, what=f"{name}: column-parallel output")
    local_weight = new_parameter(shard_segments(weight, segments, dim=out_dim, rank=rank, size=size), weight)
    mark_sharded(local_weight, name=f"{name}.weight", global_shape=weight.shape, dim=out_dim, segments=segments)
    local_bias = None
    if bias is not None:
        local_bias = new_parameter(shard_segments(bias, segments, dim=0, rank=rank, size=size), bias)
        mark_sharded(local_bias, name=f"{name}.bias", global_shape=bias.shape, dim=0, segments=segments)
    return local_weight, local_bias, local


class RowParallelLinear(_ParallelLinear):
    """A linear layer whose input features are split over the tensor-parallel group.

    Takes this rank's input features (the un-gathered output of a
    ColumnParallelLinear), sums the partial products over the group (or, under
    sequence parallel, reduce-scatters them along the sequence), then adds the
    full, replicated bias. Under sequence parallel each rank adds the bias to its
    own sequence chunk only, so the bias gradient is partial over tp and its
    placement says so (`partial_grad_axes=("tp",)`).
    """

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, *, group: ProcessGroup | None, name: str, sequence_parallel: bool = False
    ) -> RowParallelLinear:
        """This rank's share of `linear` (an nn.Linear or GPT-2's Conv1D, as for ColumnParallelLinear)."""
        transposed = is_transposed(linear)
        in_dim = 0 if transposed else 1
        weight, bias = _row_shards(linear, in_dim=in_dim, group=group, name=name, sequence_parallel=sequence_parallel)
        return cls(weight, bias, group=group, sequence_parallel=sequence_parallel, transposed=transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"RowParallelLinear holds {self.in_features} of the input features but got {x.shape[-1]}; "
                "feed it this rank's features (a ColumnParallelLinear's output with gather_output=False)"
            )
        out = _project(x, self.weight, None, transposed=self.transposed)
        if self.sequence_parallel:  # the sequence (token) dim is the one before the features
            out = reduce_scatter_sequence(out, self.group, dim=-2, counter=self.counter)
        else:
            out = reduce_from_tp(out, self.group, counter=self.counter)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local), out_features={self.out_features}, "
            f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
        )


def _row_shards(
    dense: nn.Module, *, in_dim: int, group: ProcessGroup | None, name: str, sequence_parallel: bool
) -> tuple[nn.Parameter, nn.Parameter | None]:
    rank, size = tp_rank_and_size(group)
    weight, bias = dense.weight, dense.bias
    local_partition(None, weight.shape[in_dim], size, what=f"{name}: row-parallel input")
    local_weight = new_parameter(weight.chunk(size, dim=in_dim)[rank], weight)
    mark_sharded(local_weight, name=f"{name}.weight", global_shape=weight.shape, dim=in_dim)
    local_bias = None if bias is None else new_parameter(bias, bias)
    if local_bias is not None and sequence_parallel:
        mark_partial(local_bias, name=f"{name}.bias")
    return local_weight, local_bias
