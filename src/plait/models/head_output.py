"""Final hidden states handed to a loss together with the head that would turn them into logits.

A loss that computes the cross entropy from the hidden states and the head's weight
chunk by chunk (`plait.losses.ChunkedCausalLM`) asks the model for them with
``return_hidden=True``; the tensor carries the head module as an attribute, the
way vocab-parallel logits carry their `VocabShard`.
"""

from __future__ import annotations

import torch
from torch import nn

_ATTRIBUTE = "plait_head"


def with_head(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Tag ``hidden`` (batch, seq, d_model) as the input of ``head``; returns it."""
    setattr(hidden, _ATTRIBUTE, head)
    return hidden


def head_of(outputs: object) -> nn.Module | None:
    """The head a model's hidden-state output is meant for, or None (logits, or any other output)."""
    return getattr(outputs, _ATTRIBUTE, None) if isinstance(outputs, torch.Tensor) else None
