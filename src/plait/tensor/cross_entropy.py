"""Cross entropy over logits whose vocabulary is split across the tensor-parallel group.

A `VocabParallelHead` returns each rank's slice of the logits with a
`vocab_shard` attribute; a loss function checks `is_vocab_sharded(logits)` and,
if set, calls `vocab_parallel_cross_entropy` instead of `F.cross_entropy`, so
the full-vocabulary logits never exist on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.distributed.comm import CommCounter
from plait.tensor.comm import ProcessGroup, gather_sequence_no_reduce, tp_rank_and_size

_ATTRIBUTE = "vocab_shard"


@dataclass(frozen=True)
class VocabShard:
    """Where a rank's logits sit in the vocabulary: columns [start, start + width) of `full_size`.

    Rank r holds columns [r * w, min((r + 1) * w, full_size)) with
    w = ceil(full_size / tp), so the last rank's slice may be narrower.
    `group` is the tensor-parallel group (None when tp = 1); the loss's
    collectives are recorded on `counter` when there is one.
    """

    group: ProcessGroup | None
    start: int
    full_size: int
    counter: CommCounter | None = field(default=None, compare=False)


def is_vocab_sharded(tensor: torch.Tensor) -> VocabShard | None:
    """The tensor's `VocabShard` if it is a vocab-parallel head's output, else None.

    The attribute lives on that tensor object only: read it before slicing or
    casting the logits (shift the labels, not the logits, for a causal loss).
    """
    return getattr(tensor, _ATTRIBUTE, None)


def set_vocab_shard(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Tag `tensor` as the local logits described by `shard`; returns it."""
    setattr(tensor, _ATTRIBUTE, shard)
    return tensor


def all_reduce_over_shard(tensor: torch.Tensor, shard: VocabShard | None, op: dist.ReduceOp.RedOpType) -> None:
    """Reduce per-token statistics over the shard's tensor-parallel group (nothing without one)."""
    if shard is None or shard.group is None:
        return
    if shard.counter is not None:
        shard.counter.record("all_reduce", tensor, group=shard.group, axis="tp")
    dist.all_reduce(tensor, op=op, group=shard.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, shard: VocabShard, ignore_index: int) -> torch.Tensor:
        logits32 = logits.float()  # (..., width); no copy when already fp32
        global_max = logits32.amax(dim=-1)  # (...)
        all_reduce_over_shard(global_max, shard, dist.ReduceOp.MAX)

        local_targets = targets - shard.start
        in_shard = (local_targets >= 0) & (local_targets < logits.shape[-1])
        safe_targets = local_targets.masked_fill(~in_shard, 0).unsqueeze(-1)
        target_logit = logits32.gather(-1, safe_targets).squeeze(-1).masked_fill(~in_shard, 0.0)

        probs = (logits32 - global_max.unsqueeze(-1)).exp_()  # the only (..., width) buffer
        sums = torch.stack((probs.sum(dim=-1), target_logit))  # one collective for both sums
        all_reduce_over_shard(sums, shard, dist.ReduceOp.SUM)
        sum_exp, target_logit = sums.unbind(0)

        ignored = targets == ignore_index
        loss = (sum_exp.log() - (target_logit - global_max)).masked_fill(ignored, 0.0)
        probs.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, safe_targets, in_shard, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        probs, safe_targets, in_shard, ignored = ctx.saved_tensors
        # In place on the saved softmax: a second backward through this graph
        # fails autograd's version check instead of returning wrong gradients.
        grad = probs.scatter_add_(-1, safe_targets, -in_shard.unsqueeze(-1).to(probs.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, targets: torch.Tensor, *, shard: VocabShard, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross entropy (shape of `targets`, fp32, 0 where ignored) from this rank's logit columns.

    Equals `F.cross_entropy(full_logits.flatten(0, -2), targets.flatten(), reduction="none")`
    reshaped, without gathering the vocabulary: two collectives of per-token values
    (a max, then the sum of exponentials stacked with the target logit) carry everything. Computed in fp32 whatever the logits' dtype.
    Every rank of `shard.group` must call it with the same targets.

        logits = model(input_ids)                        # (batch, seq, vocab/tp)
        shard = is_vocab_sharded(logits)
        per_token = vocab_parallel_cross_entropy(logits, targets, shard=shard)
    """
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(local_logits.shape)} and targets {tuple(targets.shape)} disagree; "
            "targets must have the logits' shape without the vocabulary dim"
        )
    return _VocabParallelCrossEntropy.apply(local_logits, targets, shard, ignore_index)


def gather_vocab_logits(local_logits: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits from a vocab-parallel head's output (for generation or eval).

    Differentiable; costs tp times the memory the vocab-parallel loss avoids.
    """
    shard = is_vocab_sharded(local_logits)
    if shard is None:
        raise ValueError("gather_vocab_logits needs the output of a VocabParallelHead (it has no vocab_shard)")
    if shard.group is None:
        return local_logits
    _, size = tp_rank_and_size(shard.group)
    width = -(-shard.full_size // size)
    padded = F.pad(local_logits, (0, width - local_logits.shape[-1]))
    return gather_sequence_no_reduce(padded, shard.group, dim=-1, counter=shard.counter)[..., : shard.full_size]
