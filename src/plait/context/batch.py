"""A cp rank's share of a batch, and the causal loss on it.

Every cp rank of a data shard gets the same rows (as tensor peers do) and keeps its two chunks of
each. Labels are shifted to the token they predict *before* the split, so the token at the end
of a chunk is scored against the first token of the next chunk, which another rank holds.
"""

from __future__ import annotations

from typing import Any

import torch

from plait.context.layout import chunk_size, token_index
from plait.losses import IGNORE_INDEX, CausalLM, aligned_cross_entropy, logits_of

Batch = dict[str, torch.Tensor]


def shard_batch(batch: Batch, *, rank: int, size: int) -> Batch:
    """This cp rank's tokens of every row: ``labels`` become next-token targets (already shifted),
    ``position_ids`` the tokens' global positions ((seq,), or the batch's per-document (batch, seq))."""
    input_ids = batch["input_ids"]
    seq = input_ids.shape[1]
    index = token_index(rank, size, chunk=chunk_size(seq, size), device=input_ids.device)
    shard = {key: value[:, index] for key, value in batch.items() if key not in ("labels", "position_ids")}
    labels = batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    shard["labels"] = targets[:, index]
    positions = batch.get("position_ids")
    if positions is None:
        shard["position_ids"] = index
    else:
        shard["position_ids"] = positions[..., index]
    return shard


class ShiftedCausalLM:
    """``plait.losses.causal_lm`` on a cp shard: ``labels`` already hold each position's target."""

    reads_labels = True

    def __call__(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return aligned_cross_entropy(logits_of(outputs), batch["labels"]), self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()


def context_loss(loss_fn: Any) -> ShiftedCausalLM:
    """The loss for cp shards; only the causal LM loss knows how its labels shift."""
    if not isinstance(loss_fn, CausalLM):
        raise ValueError(
            f"plan.cp > 1 splits each sequence over the cp ranks and needs loss_fn=plait.losses.causal_lm "
            f"(which shifts labels before the split); got {loss_fn!r}; use causal_lm or set plan.cp=1"
        )
    return ShiftedCausalLM()
