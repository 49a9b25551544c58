"""Losses of the text tasks, in plait's `loss_fn(outputs, batch) -> (loss_sum, count)` contract.

Labels align with the logits (no shift: masked-LM and T5's targets are predicted where they stand);
-100 is ignored. Under tensor parallel the logits are a vocabulary slice and the cross entropy is
computed without gathering them. `reads_labels`: the model's forward does not get `labels` (a
Hugging Face model would compute a second loss of its own).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from plait.losses import IGNORE_INDEX
from plait.tensor.cross_entropy import is_vocab_sharded, vocab_parallel_cross_entropy


def output_logits(outputs: Any, *names: str) -> torch.Tensor:
    """The first of `names` the output carries (or the output itself when it is a tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for name in names:
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"expected logits or an output with .{' or .'.join(names)}, got {type(outputs).__name__}")


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of `logits` (..., vocab or its tp slice) against aligned `labels` (...)."""
    shard = is_vocab_sharded(logits)
    if shard is not None:  # tensor parallel: never gather the vocabulary
        return vocab_parallel_cross_entropy(logits, labels, shard=shard, ignore_index=IGNORE_INDEX).sum()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class TokenCrossEntropy:
    """Cross entropy at every labelled position: (sum, number of labelled tokens). Masked LM and
    span corruption's targets. `count_tokens` gives the engine the global count before any forward."""

    reads_labels = True

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = output_logits(outputs, "logits", "prediction_logits")
        return token_cross_entropy_sum(logits, batch["labels"]), self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()


token_cross_entropy = TokenCrossEntropy()


class MaskedLMWithSentenceOrder:
    """ALBERT's pre-training loss: masked-LM mean plus sentence-order mean over the global batch, as
    transformers' AlbertForPreTraining adds them.

    Every sequence masks the same number k of tokens (plait.tasks.masked_lm), so with the global
    count of masked tokens N = k x sequences as the divisor, (mlm_sum + k x sop_sum) / N is exactly
    mlm_sum / N + sop_sum / sequences, under any split of the batch.
    """

    reads_labels = True

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        per_row = (labels != IGNORE_INDEX).sum(dim=1)
        if per_row.numel() and bool((per_row != per_row[0]).any()):
            raise ValueError(
                f"sentence-order prediction needs the same number of masked tokens in every sequence, got "
                f"{sorted(set(per_row.tolist()))}; build batches with plait.tasks.masked_lm.SentenceOrderMLM"
            )
        mlm_sum = token_cross_entropy_sum(output_logits(outputs, "prediction_logits", "logits"), labels)
        sop_logits = output_logits(outputs, "sop_logits").float()  # (batch, 2)
        sop_sum = F.cross_entropy(sop_logits, batch["sentence_order_label"], reduction="sum")
        per_sequence = per_row[0].to(sop_sum) if per_row.numel() else sop_sum.new_zeros(())
        return mlm_sum + per_sequence * sop_sum, self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()


masked_lm_with_sentence_order = MaskedLMWithSentenceOrder()
