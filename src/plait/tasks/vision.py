"""Image classification: the loss and the top-1 accuracy in plait's `loss_fn(outputs, batch)` contract.

    engine = plait.boost(build_vision("vit-tiny", ...), optimizer=..., loss_fn=image_classification, plan=...)
    accuracy = engine.evaluate(test_batches, metric=top1_accuracy)  # correct / images, over every rank

Batches are `{"pixel_values": (batch, channels, h, w), "labels": (batch,)}` (plait.data.images).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def class_logits(outputs: Any) -> torch.Tensor:
    """(batch, classes) logits of an image classifier's output (`.logits` or a tensor). A pipeline's
    last stage hands back per-token logits (batch, tokens, classes) when the model classifies its
    first token; the first token's are the model's."""
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"image classification expects logits or an output with .logits, got {type(outputs).__name__}")
    return logits[:, 0] if logits.dim() == 3 else logits


class ImageClassification:
    """Cross entropy over the batch's images: (sum, number of images).

    `count_tokens` gives the engine the global image count before any forward, so backward starts
    from loss_sum / global_count as one process would; `reads_labels`: the model's forward does not
    get `labels` (transformers would compute a second loss of its own)."""

    reads_labels = True

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = F.cross_entropy(class_logits(outputs).float(), batch["labels"], reduction="sum")
        return loss_sum, self.count_tokens(batch)

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        return torch.tensor(labels.numel(), device=labels.device)


image_classification = ImageClassification()


def top1_accuracy(outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images whose highest logit is their label, images): `engine.evaluate` sums both over micro-batches
    and ranks, so it returns the accuracy over the whole evaluation set."""
    labels = batch["labels"]
    correct = (class_logits(outputs).argmax(dim=-1) == labels).sum().float()
    return correct, torch.tensor(labels.numel(), device=labels.device)


top1_accuracy.reads_labels = True  # type: ignore[attr-defined]
