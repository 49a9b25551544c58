"""Tensor and sequence parallel: Megatron-style layers, collectives and the vocab-parallel loss.

A plan swaps a model's dense modules for the parallel ones by name
(`ColumnParallelLinear.from_dense(model.blocks[0].mlp.up, group=mesh.group("tp"), name="blocks.0.mlp.up")`);
every sharded parameter carries a placement record, and the LM head's logits
carry a `VocabShard` that the loss reads through `is_vocab_sharded`.
"""

from plait.tensor.comm import (
    copy_to_tp,
    gather_sequence,
    gather_sequence_no_reduce,
    reduce_from_tp,
    reduce_scatter_sequence,
    scatter_sequence,
    tp_rank_and_size,
)
from plait.tensor.cross_entropy import (
    VocabShard,
    gather_vocab_logits,
    is_vocab_sharded,
    set_vocab_shard,
    vocab_parallel_cross_entropy,
)
from plait.tensor.layers import ColumnParallelLinear, RowParallelLinear
from plait.tensor.sequence import (
    allreduce_partial_grads,
    mark_sequence_parallel,
    partial_over_tp,
    scatter_output_sequence,
)
from plait.tensor.vocab import VocabParallelEmbedding, VocabParallelHead

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "VocabShard",
    "allreduce_partial_grads",
    "copy_to_tp",
    "gather_sequence",
    "gather_sequence_no_reduce",
    "gather_vocab_logits",
    "is_vocab_sharded",
    "mark_sequence_parallel",
    "partial_over_tp",
    "reduce_from_tp",
    "reduce_scatter_sequence",
    "scatter_output_sequence",
    "scatter_sequence",
    "set_vocab_shard",
    "tp_rank_and_size",
    "vocab_parallel_cross_entropy",
]
