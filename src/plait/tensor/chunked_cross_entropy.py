"""Cross entropy straight from hidden states and the head's weight, a chunk of tokens at a time.

The plain path materialises the logits (tokens, vocab) and the loss keeps an fp32
softmax of the same size for backward: at vocab 128k and 8k tokens that is 4 GiB
each. Here the logits of `chunk_size` tokens exist at a time, and the gradients
of the hidden states, the weight and the bias are computed in the forward, chunk
by chunk (as Liger's fused linear cross entropy does), so nothing of vocabulary
width is kept for backward. Backward only scales the stored gradients by the
incoming scalar. Under tensor parallel each rank holds its vocabulary columns
(`VocabShard`), and the softmax statistics are summed over the group per chunk,
as `vocab_parallel_cross_entropy` does for whole logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.tensor.cross_entropy import VocabShard, all_reduce_over_shard


def _chunk_loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    shard: VocabShard | None,
    ignore_index: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of one chunk (fp32) and d(loss)/d(logits) in the logits' dtype (None without grad)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (chunk, width)
    logits32 = logits.float()
    row_max = logits32.amax(dim=-1)  # (chunk,)
    all_reduce_over_shard(row_max, shard, dist.ReduceOp.MAX)
    start = 0 if shard is None else shard.start
    local_targets = targets - start
    in_shard = (local_targets >= 0) & (local_targets < logits.shape[-1])
    safe_targets = local_targets.masked_fill(~in_shard, 0).unsqueeze(-1)
    target_logit = logits32.gather(-1, safe_targets).squeeze(-1).masked_fill(~in_shard, 0.0)
    probs = logits32.sub_(row_max.unsqueeze(-1)).exp_()  # in place: the chunk's only (chunk, width) fp32 buffer
    sums = torch.stack((probs.sum(dim=-1), target_logit))
    all_reduce_over_shard(sums, shard, dist.ReduceOp.SUM)
    sum_exp, target_logit = sums.unbind(0)
    kept = targets != ignore_index
    loss = (sum_exp.log() - (target_logit - row_max)).masked_fill(~kept, 0.0).sum()
    if not with_grad:
        return loss, None
    probs.div_(sum_exp.unsqueeze(-1))
    probs.scatter_add_(-1, safe_targets, -in_shard.unsqueeze(-1).to(probs.dtype))
    probs.mul_(kept.unsqueeze(-1).to(probs.dtype))
    return loss, probs.to(logits.dtype)


@dataclass
class _Grads:
    """The gradients forward fills chunk by chunk (None: not wanted); weight and bias accumulate in fp32."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def wanted(self) -> bool:
        return any(g is not None for g in (self.hidden, self.weight, self.bias))


def _accumulate_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    rows: slice,
    grads: _Grads,
    shard: VocabShard | None,
    ignore_index: int,
) -> torch.Tensor:
    """One chunk's summed loss; its gradients added into ``grads``. A function of its own so the chunk's
    (chunk, width) buffer is freed before the next chunk's is allocated."""
    loss, grad_logits = _chunk_loss_and_grad(
        hidden, weight, bias, targets, shard=shard, ignore_index=ignore_index, with_grad=grads.wanted
    )
    if grads.hidden is not None:
        torch.mm(grad_logits, weight, out=grads.hidden[rows])
    if grads.weight is not None:
        grads.weight.addmm_(grad_logits.t().float(), hidden.float())
    if grads.bias is not None:
        grads.bias += grad_logits.float().sum(dim=0)
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shard, chunk_size, ignore_index, grad_enabled):  # type: ignore[override]
        # needs_input_grad says True under no_grad too: evaluation would pay for gradients nobody reads
        wanted = ctx.needs_input_grad[:3] if grad_enabled else (False, False, False)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wanted[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wanted[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wanted[2] else None
        grads = _Grads(hidden=grad_hidden, weight=grad_weight, bias=grad_bias)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            total += _accumulate_chunk(
                hidden[rows],
                weight,
                bias,
                targets[rows],
                rows=rows,
                grads=grads,
                shard=shard,
                ignore_index=ignore_index,
            )
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        # In place: no second copy of the weight's gradient; a second backward through this graph is
        # not supported (it would scale the stored gradients twice), as in vocab_parallel_cross_entropy.
        grads = [next(saved).mul_(grad_total) if present else None for present in ctx.present]
        grad_hidden, grad_weight, grad_bias = grads
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    shard: VocabShard | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T + bias`` against ``targets``, never holding all the logits.

    ``hidden`` (..., d) and ``targets`` (...) at the same positions (shift them for a causal loss);
    ``weight`` (vocab or this rank's width, d). Returns a 0-dim fp32 sum over the targets that are not
    ``ignore_index``; equal to ``F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")``
    up to fp32 rounding. With ``shard`` (a vocab-parallel head's `VocabShard`) ``weight`` holds that rank's
    columns and every rank of the group must call it with the same targets.

        loss_sum = chunked_linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], chunk_size=2048)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree; "
            "targets must have the hidden states' shape without the model dim"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(
        flat_hidden, weight, bias, targets.reshape(-1), shard, chunk_size, ignore_index, torch.is_grad_enabled()
    )
