"""Group-relative policy optimisation (GRPO): no critic, advantages from a group of completions per prompt.

Each prompt gets G completions (`plait.recipes.rollout`); a completion's advantage is
(r - mean of its group) / (std of its group + eps) (the unbiased std, as TRL), the same for all its
tokens. The loss per completion token is the clipped policy-gradient objective plus beta x the k3
estimate of KL(policy || reference):

    ratio = exp(logp - old_logp);  pg = -min(ratio x A, clip(ratio, 1 - eps, 1 + eps) x A)
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1

summed over completion tokens and divided by their global count (the `(sum, count)` contract with
`count_tokens`), so micro-batches and dp ranks reproduce one process. Advantages, ``old_logps`` and
``ref_logps`` are computed per rank *before* the engine splits the batch: prompts are split over dp
ranks, each rank holds whole groups, and the batch carries everything the loss needs.

    batch = grpo_batch(policy, reference, prompts, group=4, first_index=..., sampling=..., eos_id=..., reward_fn=...)
    engine = plait.boost(policy, optimizer=..., loss_fn=PolicyLoss(clip=0.2, kl_coef=0.04), plan=plait.Plan(dp=2))
    engine.train_step(batch)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plait.losses import logits_of
from plait.recipes.rollout import Rollout, SamplingConfig, policy_logps, rollout, token_logps

Batch = dict[str, torch.Tensor]
RewardFn = Callable[[Rollout], torch.Tensor]  # a rollout -> one score per row (rows,)


def group_advantages(rewards: torch.Tensor, *, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards (rows,) laid out group after group."""
    if group < 2:
        raise ValueError(f"group={group}: GRPO compares completions of one prompt; sample at least 2 per prompt")
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}; give whole groups")
    grouped = rewards.double().view(-1, group)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1).float()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def count_completion_tokens(batch: Batch) -> torch.Tensor:
    return batch["completion_mask"].sum()


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped policy-gradient loss (plus beta x k3 KL to ``ref_logps`` when ``kl_coef`` > 0), per token.

    Reads ``input_ids``, ``completion_mask``, ``old_logps``, ``advantages`` (rows, seq) and, with a KL
    term, ``ref_logps`` from the batch. PPO uses it with ``kl_coef=0`` (its KL is folded into the rewards).
    """

    clip: float = 0.2
    kl_coef: float = 0.04

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1:
            raise ValueError(f"clip={self.clip}: the ratio clip range is a fraction in (0, 1), e.g. 0.2")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef}: the KL penalty's weight must be >= 0, e.g. 0.04")

    count_tokens = staticmethod(count_completion_tokens)

    def __call__(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["completion_mask"]
        logps = token_logps(logits_of(outputs), batch["input_ids"], mask)
        ratio = torch.exp(logps - batch["old_logps"])
        advantages = batch["advantages"]
        clipped = torch.clamp(ratio, 1 - self.clip, 1 + self.clip)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        if self.kl_coef:
            per_token = per_token + self.kl_coef * k3_kl(logps, batch["ref_logps"])
        return (per_token * mask).sum(), count_completion_tokens(batch)


def grpo_batch(
    policy: nn.Module,
    reference: nn.Module | None,
    prompts: Sequence[Sequence[int]],
    *,
    group: int,
    first_index: int,
    sampling: SamplingConfig,
    eos_id: int,
    reward_fn: RewardFn,
) -> tuple[Batch, torch.Tensor]:
    """One GRPO batch for ``prompts`` (this rank's share): (batch for `PolicyLoss`, rewards (rows,)).

    ``policy`` samples (a plain module holding the policy's current weights); ``reference`` (frozen) gives
    ``ref_logps`` (None: no KL term, zeros).
    """
    sampled = rollout(policy, prompts, num_samples=group, first_index=first_index, sampling=sampling, eos_id=eos_id)
    rewards = reward_fn(sampled).float().to(sampled.input_ids.device)  # a sandbox's scores come on the CPU
    batch = sampled.batch()
    batch["advantages"] = group_advantages(rewards, group=group)[:, None] * batch["completion_mask"]
    batch["ref_logps"] = policy_logps(reference, batch) if reference is not None else torch.zeros_like(sampled.logps)
    return batch, rewards
