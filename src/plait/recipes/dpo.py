"""Direct preference optimisation (DPO) and its reference-free successor SimPO, from preference pairs.

A batch holds pairs in adjacent rows (chosen at 2i, rejected at 2i+1): ``input_ids`` and
``attention_mask`` of prompt + response, ``labels`` equal to ``input_ids`` on the response tokens
and -100 on the prompt and padding, and for DPO ``ref_logps`` (rows,): the frozen reference
model's log-probability of each response. The reference is evaluated once, up front, under
no_grad (`with_reference_logps`), and carried in the batch, so training holds one model and one
optimizer; the policy is the plain causal LM (its forward ignores the extra key).

    batch = with_reference_logps(reference, batch)             # before training, on the base model
    engine = plait.boost(policy, optimizer=..., loss_fn=DPOLoss(beta=0.1), plan=plait.Plan(dp=2, zero=1))
    engine.train_step(batch)

Both losses return ``(sum over pairs, number of pairs)`` with `count_tokens`, so dp and
micro-batches reproduce one process's mean over pairs. Under tensor parallel the per-token
log-probs come from the vocab-sharded logits (`vocab_parallel_cross_entropy`), never gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.losses import IGNORE_INDEX, logits_of, token_nll
from plait.recipes.reward import count_pairs, pair_accuracy, split_pairs, summarise
from plait.train.decoding import model_device

Batch = dict[str, torch.Tensor]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t+1; the last position predicts nothing (IGNORE_INDEX)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (rows,), fp32.

    ``logits`` (rows, seq, vocab or vocab/tp) are the model's whole output: under tp the vocab-sharded
    slice is read where it lies (its shard record lives on that tensor object, so it is not sliced first).
    """
    return -token_nll(logits, shifted_targets(labels)).sum(dim=1)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """The number of labelled (predicted) tokens of each row (rows,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def reference_logps(reference: nn.Module, batch: Batch) -> torch.Tensor:
    """The frozen reference model's response log-probs (rows,) for ``batch``."""
    was_training = reference.training
    reference.eval()
    outputs = reference(batch["input_ids"], batch.get("attention_mask"))
    reference.train(was_training)
    return sequence_logps(logits_of(outputs), batch["labels"])


def with_reference_logps(reference: nn.Module, batch: Batch) -> Batch:
    """``batch`` plus ``ref_logps`` (rows,), the reference's log-probs computed once under no_grad, where
    the reference lies (a GPU), returned beside the batch's tensors."""
    device = model_device(reference)
    on_device = {name: tensor.to(device) for name, tensor in batch.items()}
    return {**batch, "ref_logps": reference_logps(reference, on_device).to(batch["input_ids"].device)}


def _check_beta(name: str, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"{name}: beta scales the implicit reward and must be > 0, got {beta!r}; try 0.1")


@dataclass(frozen=True)
class DPOLoss:
    """DPO: -log sigmoid(beta x ((pi_c - ref_c) - (pi_r - ref_r))), per pair, from log-probs of responses.

    ``label_smoothing`` (conservative DPO) mixes in the loss of the flipped pair:
    (1 - eps) x loss(z) + eps x loss(-z).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    reads_labels = True
    count_tokens = staticmethod(count_pairs)

    def __post_init__(self) -> None:
        _check_beta("DPOLoss", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")

    def logits(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """beta x the implicit reward margin of each pair (pairs,)."""
        if "ref_logps" not in batch:
            raise ValueError("DPO needs the reference's log-probs in the batch: wrap it with with_reference_logps")
        logratios = sequence_logps(logits_of(outputs), batch["labels"]) - batch["ref_logps"].float()
        chosen, rejected = split_pairs(logratios)
        return self.beta * (chosen - rejected)

    def __call__(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.logits(outputs, batch)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        return losses.sum(), count_pairs(batch)


@dataclass(frozen=True)
class SimPOLoss:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.

    -log sigmoid(beta x (pi_c / |y_c| - pi_r / |y_r|) - gamma) per pair, where pi is the summed
    log-prob of the response and |y| its token count. No reference model and no ``ref_logps``.
    """

    beta: float = 2.0
    gamma: float = 0.5
    reads_labels = True
    count_tokens = staticmethod(count_pairs)

    def __post_init__(self) -> None:
        _check_beta("SimPOLoss", self.beta)
        if self.gamma < 0:
            raise ValueError(f"SimPOLoss: gamma is a target reward margin, >= 0; got {self.gamma!r}")

    def logits(self, outputs: Any, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        average = sequence_logps(logits_of(outputs), labels) / response_lengths(labels).clamp(min=1)
        chosen, rejected = split_pairs(average)
        return self.beta * (chosen - rejected) - self.gamma

    def __call__(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return -F.logsigmoid(self.logits(outputs, batch)).sum(), count_pairs(batch)


@torch.no_grad()
def implicit_reward_accuracy(policy: nn.Module, batches: Iterable[Batch], *, beta: float) -> dict[str, Any]:
    """Held-out DPO accuracy: beta x (logp - ref logp) of chosen > rejected (ties half), with the mean margin.

    Each batch carries ``ref_logps`` (`with_reference_logps`). At step 0 the policy is the reference, so
    every margin is 0 and the accuracy 0.5 by construction.
    """
    return summarise(*pair_results(policy, batches, implicit_reward(beta)))


@torch.no_grad()
def likelihood_accuracy(model: nn.Module, batches: Iterable[Batch], *, normalise: bool = False) -> dict[str, Any]:
    """Plain log-likelihood preference: logp(chosen) > logp(rejected) (per token when ``normalise``)."""

    def score(logps: torch.Tensor, batch: Batch) -> torch.Tensor:
        return logps / response_lengths(batch["labels"]).clamp(min=1) if normalise else logps

    return summarise(*pair_results(model, batches, score))


def implicit_reward(beta: float) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    """DPO's implicit reward of each row: beta x (logp - the reference's logp)."""
    return lambda logps, batch: beta * (logps - batch["ref_logps"])


@torch.no_grad()
def pair_results(
    model: nn.Module, batches: Iterable[Batch], score: Callable[[torch.Tensor, Batch], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: win (1, 0.5 for a tie, 0) and margin of ``score(response logps, batch)``, chosen - rejected."""
    wins, margins = [], []
    was_training = model.training
    model.eval()
    for batch in batches:
        logps = sequence_logps(logits_of(model(batch["input_ids"], batch.get("attention_mask"))), batch["labels"])
        chosen, rejected = split_pairs(score(logps, batch))
        wins.append(pair_accuracy(chosen, rejected))
        margins.append(chosen - rejected)
    model.train(was_training)
    return torch.cat(wins), torch.cat(margins)
