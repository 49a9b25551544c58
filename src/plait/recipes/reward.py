"""A reward model: a causal LM with a scalar head, trained on preference pairs.

The score of a sequence is a linear head on the LM's final (normed) hidden state at its last
non-pad token. Pairs sit in adjacent rows (chosen at 2i, rejected at 2i+1), so the engine's split
along dim 0 never separates a pair as long as every rank's micro-batch holds an even number of
rows; the loss is -log sigmoid(r_chosen - r_rejected), summed over pairs and divided by the global
number of pairs (the `(sum, count)` contract with `count_tokens`), exactly what one process computes.

    reward = RewardModel(lm)                              # lm: plait GPT or a Hugging Face causal LM
    engine = plait.boost(reward, optimizer=..., loss_fn=pairwise_loss, plan=plait.Plan(dp=2))
    engine.train_step({"input_ids": ids, "attention_mask": mask})   # (2 x pairs, seq)
    scores = reward.score(ids, mask)                      # (batch,)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


def hidden_size_of(lm: nn.Module) -> int:
    """The width of ``lm``'s final hidden states (plait: ``d_model``, Hugging Face: ``hidden_size``)."""
    config = getattr(lm, "config", None)
    for name in ("d_model", "hidden_size", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(
        f"cannot read the hidden size of a {type(lm).__name__}: its config has no d_model or hidden_size; "
        "pass hidden_size= to RewardModel"
    )


def final_hidden(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The final normed hidden states (batch, seq, hidden) of a plait GPT or a Hugging Face causal LM."""
    if "return_hidden" in inspect.signature(lm.forward).parameters:
        return lm(input_ids, attention_mask, return_hidden=True)
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise TypeError(f"a {type(lm).__name__} offers neither return_hidden nor a base_model for its hidden states")
    return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's last non-pad position (batch,): the last 1 of ``attention_mask`` (the last token without one)."""
    if attention_mask is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


class RewardModel(nn.Module):
    """``lm`` with a linear head scoring each sequence at its last non-pad token.

    The head draws its initial weight from torch's global RNG (``nn.Linear``'s own init), so the
    same seed gives the same reward model in every process. ``forward`` returns the scores
    (batch,), which is what `pairwise_loss` reads.
    """

    def __init__(self, lm: nn.Module, *, hidden_size: int | None = None) -> None:
        super().__init__()
        self.lm = lm
        width = hidden_size if hidden_size is not None else hidden_size_of(lm)
        device = next(lm.parameters()).device
        self.score_head = nn.Linear(width, 1, device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        hidden = final_hidden(self.lm, input_ids, attention_mask)  # (batch, seq, hidden)
        index = last_token_index(input_ids, attention_mask)
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), index]  # (batch, hidden)
        return self.score_head(last).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (batch,) of right-padded sequences, without gradients (for PPO and evaluation)."""
        with torch.no_grad():
            return self(input_ids, attention_mask)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0, 2, 4, ... (chosen) and 1, 3, 5, ... (rejected) of a pair-interleaved tensor."""
    if values.size(0) % 2:
        raise ValueError(
            f"a preference batch holds pairs in adjacent rows, but this micro-batch has {values.size(0)} rows; "
            "give every rank and micro-batch an even number of rows (global_batch = 2 x pairs, pairs divisible by "
            "dp x microbatches)"
        )
    pairs = values.view(values.size(0) // 2, 2, *values.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def count_pairs(batch: Batch) -> torch.Tensor:
    """The number of pairs in a pair-interleaved batch (the engine's divisor, known before any forward)."""
    rows = next(iter(batch.values())).size(0)
    return torch.tensor(rows // 2)


class PairwiseLoss:
    """-log sigmoid(r_chosen - r_rejected): ``(sum over pairs, number of pairs)`` from the scores (rows,)."""

    count_tokens = staticmethod(count_pairs)

    def __call__(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = split_pairs(outputs)
        return -F.logsigmoid(chosen - rejected).sum(), count_pairs(batch)


pairwise_loss = PairwiseLoss()


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The fraction of pairs with chosen > rejected, a tie counting half (per pair: 1, 0.5 or 0)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


@torch.no_grad()
def preference_accuracy(model: RewardModel, batches: Iterable[Batch]) -> dict[str, Any]:
    """Held-out accuracy (ties half) and the mean score margin with its standard error, over ``batches``."""
    return summarise(*reward_results(model, batches))


@torch.no_grad()
def reward_results(model: RewardModel, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: win (1, 0.5 for a tie, 0) and score margin, chosen - rejected."""
    wins, margins = [], []
    was_training = model.training
    model.eval()
    for batch in batches:
        chosen, rejected = split_pairs(model(batch["input_ids"], batch.get("attention_mask")))
        wins.append(pair_accuracy(chosen, rejected))
        margins.append(chosen - rejected)
    model.train(was_training)
    return torch.cat(wins), torch.cat(margins)


def summarise(wins: torch.Tensor, margins: torch.Tensor) -> dict[str, Any]:
    """Accuracy and mean margin of per-pair results, each with its standard error."""
    num = wins.numel()
    if num == 0:
        raise ValueError("no held-out pairs to score; give the evaluation at least one preference pair")

    def stderr(values: torch.Tensor) -> float:
        return float(values.double().std() / num**0.5) if num > 1 else 0.0

    return {
        "pairs": num,
        "accuracy": float(wins.double().mean()),
        "accuracy_stderr": stderr(wins),
        "margin": float(margins.double().mean()),
        "margin_stderr": stderr(margins),
    }
