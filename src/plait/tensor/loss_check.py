"""Refuse a loss that reads vocab-parallel logits as if they held the whole vocabulary.

Under tensor parallel each rank's logits are its slice of the vocabulary, so
`F.cross_entropy` on them fails deep in torch ("Target 365 is out of bounds")
on some ranks, or quietly computes a wrong loss where every target happens to
fall inside the slice. `checked_loss` runs a user's loss with a
`TorchFunctionMode` that stops the whole-vocabulary operations on a dimension
as wide as the slice, on every rank alike, with the fix in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from plait.tensor.cross_entropy import VocabShard, is_vocab_sharded

# Operations that treat one dimension as the vocabulary: the dimension of the
# classes for the losses, the `dim` argument for the normalisations.
_LOSSES = (F.cross_entropy, F.nll_loss)
_NORMALISATIONS = (
    F.log_softmax,
    F.softmax,
    torch.log_softmax,
    torch.softmax,
    torch.Tensor.log_softmax,
    torch.Tensor.softmax,
)


def sharded_logits(outputs: Any) -> torch.Tensor | None:
    """The model output's logits when they are a vocab-parallel head's slice, else None."""
    if isinstance(outputs, (tuple, list)) and outputs:  # a Hugging Face model with return_dict=False
        outputs = outputs[0]
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and is_vocab_sharded(logits) is not None else None


def _vocab_dim_size(func: Callable[..., Any], args: tuple, kwargs: dict) -> int | None:
    """The size of the dimension `func` treats as the vocabulary, or None for other operations."""
    tensor = args[0] if args else kwargs.get("input")
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return None
    if func in _LOSSES:
        return tensor.shape[1 if tensor.dim() >= 2 else 0]
    if func in _NORMALISATIONS:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return tensor.shape[dim] if isinstance(dim, int) else None
    return None


def vocab_sharded_error(func: Callable[..., Any], *, width: int, shard: VocabShard) -> ValueError:
    name = f"{getattr(func, '__module__', None) or 'torch.Tensor'}.{getattr(func, '__name__', func)}"
    return ValueError(
        f"loss_fn applied {name} to vocab-parallel logits: under tensor parallel each rank's logits hold "
        f"{width} of the {shard.full_size} vocabulary columns, so a loss over them as a whole vocabulary is "
        "wrong (or fails with 'Target ... is out of bounds'). Use plait.losses.causal_lm, or in your own "
        "loss plait.tensor.vocab_parallel_cross_entropy(logits, targets, shard=plait.tensor.is_vocab_sharded("
        "logits)), or gather the whole vocabulary first with plait.tensor.gather_vocab_logits(logits)"
    )


class _WholeVocabularyGuard(TorchFunctionMode):
    def __init__(self, *, width: int, shard: VocabShard) -> None:
        super().__init__()
        self.width = width
        self.shard = shard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _LOSSES or func in _NORMALISATIONS) and _vocab_dim_size(func, args, kwargs) == self.width:
            raise vocab_sharded_error(func, width=self.width, shard=self.shard)
        return func(*args, **kwargs)


class CheckedLoss:
    """`loss_fn` run under the guard whenever the outputs are vocab-parallel logits.

    Plait's losses (and a user's that calls `vocab_parallel_cross_entropy` or
    gathers the logits first) pass untouched. Attributes the engine reads
    (`reads_labels`, `count_tokens`) come from the wrapped function.
    """

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        self.loss_fn = loss_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loss_fn"], name)

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> Any:
        logits = sharded_logits(outputs)
        shard = is_vocab_sharded(logits) if logits is not None else None
        if logits is None or shard is None or logits.shape[-1] == shard.full_size:  # whole: any loss is right
            return self.loss_fn(outputs, batch)
        with _WholeVocabularyGuard(width=logits.shape[-1], shard=shard):
            return self.loss_fn(outputs, batch)
