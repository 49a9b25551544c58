"""Losses in the contract `loss_fn(outputs, batch)`.

A loss returns either a scalar mean (micro-batches then count equally) or a
pair `(loss_sum, num_tokens)`; with the pair, the step's loss is the sum over
all micro-batches and data-parallel ranks divided by the global token count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from plait.models.head_output import head_of
from plait.tensor.chunked_cross_entropy import chunked_linear_cross_entropy
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


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (batch, seq), fp32, of ``logits`` (batch, seq, vocab) against ``targets`` at the
    same positions (0 where IGNORE_INDEX); under tensor parallel the vocab-sharded slice is read where it lies
    (its shard record lives on that tensor object, so pass the model's whole output, not a slice of it)."""
    shard = is_vocab_sharded(logits)
    if shard is not None:
        return vocab_parallel_cross_entropy(logits, targets, shard=shard, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


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


class ChunkedCausalLM(CausalLM):
    """`causal_lm` computed from the final hidden states and the head's weight, ``chunk_size`` tokens at a time.

    The logits of the whole batch never exist (nor their fp32 softmax): the peak of the loss is about
    ``chunk_size x vocab`` fp32 values (``/ tp`` under tensor parallel) instead of twice
    ``tokens x vocab``. The engine asks a plait GPT for its hidden states (``return_hidden=True``);
    any other output (a Hugging Face model's logits, a pipeline stage's) takes `causal_lm`'s path, as does
    context parallel (its shards' loss is its own).
    The loss runs inside the head's call, so under ZeRO-3 the head is gathered for it as for its logits.

        engine = plait.boost(model, optimizer=..., loss_fn=plait.losses.ChunkedCausalLM(1024), plan=plan)
    """

    reads_hidden = True

    # 1,024 tokens: 0.5 GiB of fp32 logits at vocab 128k (1/8 of that per rank at tp=8), while each chunk's
    # matmuls stay large enough to run at the machine's matmul rate.
    def __init__(self, chunk_size: int = 1024) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ChunkedCausalLM: chunk_size is tokens per chunk, a positive int; got {chunk_size!r}")
        self.chunk_size = chunk_size

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        head = head_of(outputs)
        if head is None:
            return super().__call__(outputs, batch)
        labels = batch["labels"]  # whole-sequence hidden states, the last target ignored: no copy of a slice
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)

        def loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shard: Any) -> torch.Tensor:
            return chunked_linear_cross_entropy(
                hidden, weight, targets, bias=bias, shard=shard, chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX
            )

        return head_loss(head, outputs, loss), self.count_tokens(batch)

    def __repr__(self) -> str:
        return f"ChunkedCausalLM(chunk_size={self.chunk_size})"


def with_hidden_request(batch: dict[str, Any], *, loss_fn: Any, model: torch.nn.Module) -> dict[str, Any]:
    """``batch`` plus ``return_hidden=True`` when ``loss_fn`` reads hidden states and ``model``'s forward offers them."""
    if getattr(loss_fn, "reads_hidden", False) and "return_hidden" in inspect.signature(model.forward).parameters:
        return {**batch, "return_hidden": True}
    return batch


def head_loss(head: torch.nn.Module, hidden: torch.Tensor, loss: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``loss(input, weight, bias, vocab shard or None)`` of ``head``: inside the head's own call where it takes
    one (plait's `LMHead`, `VocabParallelHead`: ZeRO-3 has the weight gathered there), else from a plain
    `nn.Linear`'s parameters."""
    if "loss" in inspect.signature(head.forward).parameters:
        return head(hidden, loss=loss)
    if isinstance(head, torch.nn.Linear):
        return loss(hidden, head.weight, head.bias, None)
    raise TypeError(f"ChunkedCausalLM cannot read the weight of a {type(head).__name__} head; use causal_lm")


def causal_lm_mean(outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token loss of one batch (what one plain process computes)."""
    loss_sum, num_tokens = causal_lm(outputs, batch)
    return loss_sum / num_tokens.clamp(min=1)


causal_lm_mean.reads_labels = True  # type: ignore[attr-defined]
