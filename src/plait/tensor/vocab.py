"""Vocabulary-parallel embedding and LM head, built from an existing dense module.

The vocabulary is split in rows of w = ceil(vocab / tp): rank r holds rows
[r * w, (r + 1) * w), and the last rank's shard is zero-padded past the
vocabulary so every shard has the same shape (even collectives, and one
parameter shape per rank). The placement's `global_shape` is the dense,
unpadded shape: gathering the shards and keeping the first `vocab` rows gives
the dense weight back. Padding rows are never looked up, never produce a logit
and get no gradient.

Tied embeddings: build the embedding first, then `VocabParallelHead.tied_to(embedding)`,
which shares the embedding's local shard parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from plait.distributed.comm import CommCounter
from plait.tensor._shard import mark_sharded, new_parameter, padded_rows, rows_per_rank
from plait.tensor.comm import (
    ProcessGroup,
    copy_to_tp,
    gather_sequence,
    reduce_from_tp,
    reduce_scatter_sequence,
    tp_rank_and_size,
)
from plait.tensor.cross_entropy import VocabShard, set_vocab_shard
from plait.tensor.layers import _ParallelLinear


def _shard_rows(weight: torch.Tensor, *, group: ProcessGroup | None, name: str) -> nn.Parameter:
    rank, size = tp_rank_and_size(group)
    per_rank = rows_per_rank(weight.shape[0], size, what=name)
    local = new_parameter(padded_rows(weight.detach(), rank=rank, per_rank=per_rank), weight)
    mark_sharded(local, name=name, global_shape=weight.shape, dim=0)
    return local


class _VocabRange:
    """Which vocabulary rows of a padded shard are real: [start, start + num_local)."""

    def __init__(self, group: ProcessGroup | None, *, rows: int, vocab_size: int) -> None:
        rank, _ = tp_rank_and_size(group)
        self.start = rank * rows
        self.num_local = min(rows, vocab_size - self.start)


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split over the tensor-parallel group.

    Each rank looks up the ids it holds (zeros for the others) and the partial
    results are summed over the group; under sequence parallel they are
    reduce-scattered instead, so the output is this rank's sequence chunk
    (batch, seq/tp, dim).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        *,
        group: ProcessGroup | None,
        num_embeddings: int,
        padding_idx: int | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.weight = weight  # (ceil(vocab / tp), dim), zero rows past the vocabulary
        self.group = group
        self.counter: CommCounter | None = None  # set by `count_collectives` once the engine has one
        self.num_embeddings = num_embeddings
        self.embedding_dim = weight.shape[1]
        self.sequence_parallel = sequence_parallel
        self.range = _VocabRange(group, rows=weight.shape[0], vocab_size=num_embeddings)
        self.padding_idx = padding_idx
        local_padding = None if padding_idx is None else padding_idx - self.range.start
        self.local_padding_idx = local_padding if local_padding in range(self.range.num_local) else None

    @classmethod
    def from_dense(
        cls, embedding: nn.Embedding, *, group: ProcessGroup | None, name: str, sequence_parallel: bool = False
    ) -> VocabParallelEmbedding:
        """This rank's rows of `embedding`; `name` is its name in the model."""
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError(f"{name}: VocabParallelEmbedding supports neither max_norm nor sparse; turn them off")
        weight = _shard_rows(embedding.weight, group=group, name=f"{name}.weight")
        padding_idx = embedding.padding_idx
        return cls(
            weight,
            group=group,
            num_embeddings=embedding.num_embeddings,
            padding_idx=padding_idx,
            sequence_parallel=sequence_parallel,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.range.start
        outside = (local_ids < 0) | (local_ids >= self.range.num_local)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight, self.local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # (batch, seq, dim), partial over tp
        leave = reduce_scatter_sequence if self.sequence_parallel else reduce_from_tp
        return leave(out, self.group, counter=self.counter)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.range.start}, "
            f"{self.range.start + self.range.num_local}), sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelHead(_ParallelLinear):
    """The LM head, column-parallel over the vocabulary, that never gathers the logits.

    Returns this rank's logits (batch, seq, vocab columns it holds) tagged with a
    `vocab_shard` attribute (a `VocabShard`), which `vocab_parallel_cross_entropy`
    needs. Under sequence parallel the input is this rank's sequence chunk and is
    all-gathered first, so the logits cover the whole sequence.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        *,
        group: ProcessGroup | None,
        vocab_size: int,
        sequence_parallel: bool = False,
    ) -> None:
        # weight (ceil(vocab / tp), dim), zero rows past the vocabulary
        super().__init__(weight, bias, group=group, sequence_parallel=sequence_parallel)
        self.range = _VocabRange(group, rows=weight.shape[0], vocab_size=vocab_size)
        self.vocab_size = vocab_size

    @property
    def shard(self) -> VocabShard:
        """Where this rank's logits sit in the vocabulary (and the counter the loss's collectives report to)."""
        return VocabShard(group=self.group, start=self.range.start, full_size=self.vocab_size, counter=self.counter)

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        *,
        group: ProcessGroup | None,
        name: str,
        sequence_parallel: bool = False,
    ) -> VocabParallelHead:
        """This rank's vocabulary rows of a head (an nn.Linear, or a (vocab, dim) weight).

        Copies the weight: for a head tied to the embedding use `tied_to`, or the
        tie is broken.
        """
        is_module = isinstance(linear_or_weight, nn.Module)
        weight = linear_or_weight.weight if is_module else linear_or_weight
        bias = linear_or_weight.bias if is_module else None
        local_weight = _shard_rows(weight, group=group, name=f"{name}.weight")
        local_bias = None if bias is None else _shard_rows(bias, group=group, name=f"{name}.bias")
        return cls(
            local_weight, local_bias, group=group, vocab_size=weight.shape[0], sequence_parallel=sequence_parallel
        )

    @classmethod
    def tied_to(
        cls,
        embedding: VocabParallelEmbedding,
        *,
        bias: torch.Tensor | None = None,
        bias_name: str = "lm_head.bias",
        sequence_parallel: bool = False,
    ) -> VocabParallelHead:
        """A head that shares `embedding`'s local vocabulary shard (tied input and output embeddings);
        the head's own `bias` (BERT's decoder has one) is copied as this rank's rows, which checkpoints
        name `bias_name`."""
        return cls(
            embedding.weight,
            None if bias is None else _shard_rows(bias, group=embedding.group, name=bias_name),
            group=embedding.group,
            vocab_size=embedding.num_embeddings,
            sequence_parallel=sequence_parallel,
        )

    def forward(self, x: torch.Tensor, loss: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """This rank's logits; with ``loss``, ``loss(input, weight, bias, shard)`` instead (a chunked loss
        that never makes the logits, run inside this call so hooks on the head hold for it)."""
        x, weight, bias, shard = self.loss_inputs(x)
        if loss is not None:
            return loss(x, weight, bias, shard)
        return set_vocab_shard(F.linear(x, weight, bias), shard)  # (batch, seq, num_local)

    def loss_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, VocabShard]:
        """What the logits are made of: the whole-sequence input, this rank's weight and bias rows
        (padding dropped) and the shard; a chunked loss takes these instead of the logits."""
        enter = gather_sequence if self.sequence_parallel else copy_to_tp
        x = enter(x, self.group, counter=self.counter)
        num_local = self.range.num_local
        bias = None if self.bias is None else self.bias[:num_local]
        return x, self.weight[:num_local], bias, self.shard

    def extra_repr(self) -> str:
        end = self.range.start + self.range.num_local
        return f"vocab rows [{self.range.start}, {end}) of {self.shard.full_size}, sequence_parallel={self.sequence_parallel}"
