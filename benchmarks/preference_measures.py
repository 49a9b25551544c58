"""Measures of a preference benchmark (finetune_dpo.py, rl_reward_model.py) on pairs encoded two rows each
(chosen at 2i, rejected at 2i+1): wins and margins per corruption kind, and the paired before/after counts."""

from __future__ import annotations

import math
from typing import Any

import torch

from plait.losses import logits_of
from plait.recipes.data.preferences import CORRUPTIONS, PreferencePair, encode_pairs
from plait.recipes.dpo import sequence_logps
from plait.recipes.reward import pair_accuracy, summarise

EVAL_PAIRS = 16  # per forward


def eval_batches(pairs: list[PreferencePair], tokenizer: Any, *, seq_len: int) -> list[dict[str, torch.Tensor]]:
    return [
        encode_pairs(pairs[i : i + EVAL_PAIRS], tokenizer, seq_len=seq_len) for i in range(0, len(pairs), EVAL_PAIRS)
    ]


def kind_rows(kinds: list[str]) -> dict[str, torch.Tensor]:
    """Row indices of all pairs and of each corruption kind's pairs (kinds that occur)."""
    rows = {"all": torch.arange(len(kinds))}
    for kind in CORRUPTIONS:
        if kind in kinds:
            rows[kind] = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
    return rows


def by_kind(wins: torch.Tensor, margins: torch.Tensor, kinds: list[str]) -> dict[str, Any]:
    """The summary over all pairs and over each corruption kind's pairs."""
    return {name: summarise(wins[rows], margins[rows]) for name, rows in kind_rows(kinds).items()}


@torch.no_grad()
def row_logps(model: torch.nn.Module, batches: list) -> torch.Tensor:
    """Every held-out row's response log-prob (one forward per batch; each metric is derived from these)."""
    model.eval()
    logps = [sequence_logps(logits_of(model(b["input_ids"], b["attention_mask"])), b["labels"]) for b in batches]
    model.train()
    return torch.cat(logps)


def pairwise(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (rows 2i, 2i+1): win (ties half) and margin, chosen - rejected."""
    chosen, rejected = scores[0::2], scores[1::2]
    return pair_accuracy(chosen, rejected), chosen - rejected


def mcnemar(before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    """Paired right/wrong per pair (margin > 0) before and after: the four counts and the exact two-sided
    binomial p of the discordant ones (McNemar's exact test)."""
    flipped_right = int((~before & after).sum())
    flipped_wrong = int((before & ~after).sum())
    discordant = flipped_right + flipped_wrong
    tail = sum(math.comb(discordant, k) for k in range(min(flipped_right, flipped_wrong) + 1)) / 2**discordant
    return {
        "both_right": int((before & after).sum()),
        "both_wrong": int((~before & ~after).sum()),
        "flipped_right": flipped_right,
        "flipped_wrong": flipped_wrong,
        "p_two_sided": min(1.0, 2 * tail),
    }


def row(name: str, summary: dict[str, Any]) -> list[str]:
    s = summary["all"]
    kinds = " / ".join(f"{summary[k]['accuracy']:.3f}" for k in CORRUPTIONS if k in summary)
    return [
        name,
        f"{s['accuracy']:.3f} ± {s['accuracy_stderr']:.3f}",
        f"{s['margin']:+.4f} ± {s['margin_stderr']:.4f}",
        kinds,
    ]
