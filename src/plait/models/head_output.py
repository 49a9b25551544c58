"""Final hidden states handed to a loss together with the head that would turn them into logits.

A loss that computes the cross entropy from the hidden states and the head's weight chunk by chunk
(`plait.losses.ChunkedCausalLM`) asks the model for them with ``return_hidden=True``; the tensor
carries the head module as an attribute, the way vocab-parallel logits carry their `VocabShard`.
The loss then runs inside the head's own call (``head(hidden, loss=...)``), so what a strand hooks
on that module (ZeRO-3 gathers its weight before the call and releases it after) holds for the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ATTRIBUTE = "plait_head"


def with_head(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Tag ``hidden`` (batch, seq, d_model) as the input of ``head``; returns it."""
    setattr(hidden, _ATTRIBUTE, head)
    return hidden


def head_of(outputs: object) -> nn.Module | None:
    """The head a model's hidden-state output is meant for, or None (logits, or any other output)."""
    return getattr(outputs, _ATTRIBUTE, None) if isinstance(outputs, torch.Tensor) else None


# (input, weight, bias, vocab shard or None) -> the loss; the head calls it inside its forward
HeadLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", object], torch.Tensor]


class LMHead(nn.Linear):
    """The LM head: an ``nn.Linear`` (same parameters, same state dict) whose call can also hand its
    input and weight to a loss, ``head(hidden, loss=fn)``, instead of returning logits."""

    def forward(self, input: torch.Tensor, loss: HeadLoss | None = None) -> torch.Tensor:
        if loss is not None:
            return loss(input, self.weight, self.bias, None)
        return F.linear(input, self.weight, self.bias)
