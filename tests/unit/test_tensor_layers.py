"""Tensor-parallel layers with one rank (group=None): the identity of the dense modules, and user errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from plait.distributed.placement import Placement, placement_of, set_placement
from plait.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    VocabShard,
    copy_to_tp,
    gather_vocab_logits,
    is_vocab_sharded,
    mark_sequence_parallel,
    reduce_scatter_sequence,
    vocab_parallel_cross_entropy,
)
from plait.tensor._shard import local_partition, rows_per_rank


def test_collectives_are_the_identity_without_a_group() -> None:
    x = torch.randn(2, 3)
    assert copy_to_tp(x, None) is x
    assert reduce_scatter_sequence(x, None) is x


def test_layers_with_one_rank_equal_dense() -> None:
    torch.manual_seed(0)
    linear, embedding = nn.Linear(8, 12), nn.Embedding(10, 8)
    x, ids = torch.randn(2, 3, 8), torch.randint(10, (2, 3))
    column = ColumnParallelLinear.from_dense(linear, group=None, name="up", partition=[4, 8])
    row = RowParallelLinear.from_dense(nn.Linear(12, 8), group=None, name="down")
    assert_close(column(x), linear(x))
    assert row(column(x)).shape == (2, 3, 8)
    assert_close(VocabParallelEmbedding.from_dense(embedding, group=None, name="embed")(ids), embedding(ids))
    logits = VocabParallelHead.from_dense(embedding.weight, group=None, name="lm_head")(x)
    assert is_vocab_sharded(logits) == VocabShard(group=None, start=0, full_size=10)
    assert_close(gather_vocab_logits(logits), F.linear(x, embedding.weight))
    assert placement_of(column.weight) == Placement("up.weight", (12, 8), dim_shards=(("tp", 0),), segments=(4, 8))


def test_cross_entropy_with_one_rank_equals_dense() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.tensor([[1, 2, -100, 4, 10], [0, -100, 3, 3, 7]])
    loss = vocab_parallel_cross_entropy(logits, targets, shard=VocabShard(group=None, start=0, full_size=11))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 5)
    assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    assert_close(grad, expected_grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()  # the saved softmax became the gradient: a second backward must not pass silently


def test_cross_entropy_rejects_mismatched_targets() -> None:
    shard = VocabShard(group=None, start=0, full_size=4)
    with pytest.raises(ValueError, match="targets must have the logits' shape"):
        vocab_parallel_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), shard=shard)


def test_partition_errors_name_the_fix() -> None:
    assert local_partition([64, 32, 32], 128, 2, what="qkv") == (32, 16, 16)
    with pytest.raises(ValueError, match="sums to 96"):
        local_partition([64, 32], 128, 2, what="qkv")
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 4"):
        local_partition([64, 30, 34], 128, 4, what="qkv")
    with pytest.raises(ValueError, match="use a smaller tp"):
        rows_per_rank(5, 4, what="embed.weight")


def test_gather_vocab_logits_needs_a_head_output() -> None:
    with pytest.raises(ValueError, match="VocabParallelHead"):
        gather_vocab_logits(torch.randn(2, 3))


def test_mark_sequence_parallel_records_partial_grads() -> None:
    norm = nn.LayerNorm(4)
    set_placement(norm.bias, Placement("final.bias", (4,), dim_shards=(("tp", 0),)))
    mark_sequence_parallel(norm, name_prefix="final")
    assert placement_of(norm.weight) == Placement("final.weight", (4,), partial_grad_axes=("tp",))
    assert placement_of(norm.bias).partial_grad_axes == ("tp",)
    assert placement_of(norm.bias).dim_shards == (("tp", 0),)


def test_embedding_rejects_max_norm() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        VocabParallelEmbedding.from_dense(nn.Embedding(4, 2, max_norm=1.0), group=None, name="embed")
