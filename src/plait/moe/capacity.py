"""From routing choices to token slots: capacity per routing group, dropping, sorting by expert.

A slot is one (token, choice) pair; a token routed top-k fills k slots. Slots are
ranked as GShard does: every token's 1st choice before any 2nd choice, and within one
choice by position in the group, so under a tight capacity the 2nd choices drop first
and later tokens before earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """The routing decisions a dispatch needs, for the kept slots sorted by expert.

    Slots of one expert are contiguous, so expert e's tokens are the
    ``tokens_per_expert[e]`` rows after those of experts 0..e-1.
    """

    token_index: torch.Tensor  # (S_kept,) int64: the row of the flat (T, d) input each slot carries
    weight: torch.Tensor  # (S_kept,) fp32: the router weight its expert output is scaled by
    expert_index: torch.Tensor  # (S_kept,) int64, non-decreasing
    tokens_per_expert: torch.Tensor  # (E,) int64: kept slots per expert
    routed_counts: torch.Tensor  # (G, E) int64: slots routed to each expert per group, before dropping
    num_slots: int  # T * k, kept or not

    @property
    def num_dropped(self) -> torch.Tensor:
        """0-dim: slots dropped for lack of capacity."""
        return self.num_slots - self.tokens_per_expert.sum()


def assign_slots(
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    *,
    num_experts: int,
    capacity: int | None,
) -> Assignment:
    """Keep at most ``capacity`` slots per expert per group, in GShard priority; sort them by expert.

    ``expert_index`` and ``weight`` are (G, T_g, k): G routing groups of T_g tokens, whose
    rows are ``g * T_g + t`` of the flat input. ``capacity=None`` keeps every slot.
    """
    num_groups, tokens_per_group, top_k = expert_index.shape
    device = expert_index.device
    # Slots in (group, choice, token) order: within a group, priority order.
    slot_expert = expert_index.permute(0, 2, 1).reshape(-1)
    slot_weight = weight.permute(0, 2, 1).reshape(-1)
    tokens = torch.arange(num_groups * tokens_per_group, device=device).view(num_groups, 1, tokens_per_group)
    slot_token = tokens.expand(num_groups, top_k, tokens_per_group).reshape(-1)
    slot_group = torch.arange(num_groups, device=device).repeat_interleave(top_k * tokens_per_group)
    key = slot_expert * num_groups + slot_group  # sorts by expert, then group; stable keeps priority
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts * num_groups)  # (E * G,)
    if capacity is not None:
        starts = torch.cumsum(counts, dim=0) - counts
        rank_in_expert = torch.arange(order.numel(), device=device) - starts[key[order]]
        order = order[rank_in_expert < capacity]
    kept_expert = slot_expert[order]
    return Assignment(
        token_index=slot_token[order],
        weight=slot_weight[order],
        expert_index=kept_expert,
        tokens_per_expert=torch.bincount(kept_expert, minlength=num_experts),
        routed_counts=counts.view(num_experts, num_groups).t(),
        num_slots=slot_expert.numel(),
    )
