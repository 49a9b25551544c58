"""Losses in the contract `loss_fn(outputs, batch)`.

A loss returns either a scalar mean (micro-batches then count equally) or a
pair `(loss_sum, num_tokens)`; with the pair, the step's loss is the sum over
all micro-batches and data-parallel ranks divided by the global token count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from plait.tensor.cross_entropy import is_vocab_sharded, vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a plait model (a tensor) or a Hugging Face model (`.logits`)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(f"causal_lm expects logits or an output with .logits, got {type(outputs).__name__}")
    return logits


def aligned_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of ``logits`` (batch, seq, vocab) against ``targets`` (batch, seq) at the same
    positions (IGNORE_INDEX skipped); under tensor parallel the vocabulary is never gathered."""
    shard = is_vocab_sharded(logits)
    if shard is not None:
        return vocab_parallel_cross_entropy(logits, targets, shard=shard, ignore_index=IGNORE_INDEX).sum()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class CausalLM:
    """Next-token cross entropy: (sum over predicted tokens, number of them).

    `labels` align with `input_ids`; position t predicts label t+1; -100 is
    ignored. `count_tokens` tells the engine the count before any forward, so
    backward can start from loss_sum / global_count exactly as one process
    would (the same rounding, not merely the same value). `reads_labels`: the
    engine keeps `labels` from the model's forward, so a Hugging Face model
    does not compute a second cross entropy of its own.
    """

    reads_labels = True

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = logits_of(outputs), batch["labels"]
        if is_vocab_sharded(logits) is not None:  # vocab-sharded logits are used whole; the last target is ignored
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
            return aligned_cross_entropy(logits, targets), self.count_tokens(batch)
        return aligned_cross_entropy(logits[:, :-1], labels[:, 1:]), self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


causal_lm = CausalLM()


def causal_lm_mean(outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token loss of one batch (what one plain process computes)."""
    loss_sum, num_tokens = causal_lm(outputs, batch)
    return loss_sum / num_tokens.clamp(min=1)


causal_lm_mean.reads_labels = True  # type: ignore[attr-defined]
