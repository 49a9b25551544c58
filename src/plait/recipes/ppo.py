"""PPO with actor, critic, reference and reward models (the ColossalChat / DeepSpeed-Chat pipeline).

One iteration: the actor samples completions (rollout), the reward model scores them, the frozen
reference gives per-token log-probs, and the per-token reward is -kl_coef x (logp - ref_logp) on every
completion token plus the score on the last one. GAE (gamma, lambda) over the critic's values gives
advantages and returns; then `ppo_epochs` optimizer steps of the actor (clipped policy loss,
`plait.recipes.grpo.PolicyLoss` with no KL term) and of the critic (clipped value loss) on that batch.

Placement (each model on a plan of its own):
- actor: a `plait.boost` engine under the training plan (params, grads, optimizer state as the plan shards them);
- critic: a second engine (a value head on a causal LM), under its own plan;
- rollout: a plain replica of the actor, refreshed once per iteration from ``engine.model_state_dict()``
  (one gather per iteration, not a ZeRO-3 gather per token; params only, eval mode, no_grad), which also
  computes the old log-probs; a plain replica of the critic computes the old values the same way;
- reference and reward: frozen plain modules (params only, no grads, no optimizer state), replicated.
Prompts are split over dp ranks; every sample's generator is seeded by its global index, so any dp
split draws the samples one process draws. Advantages are not whitened (that would need the global
batch); each PPO epoch is one optimizer step over the whole rollout batch (micro-batches as the plan says).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from plait.recipes.grpo import PolicyLoss, count_completion_tokens
from plait.recipes.reward import RewardModel, final_hidden, hidden_size_of
from plait.recipes.rl_config import PPO_FIELDS, PPOSection, check_ppo
from plait.recipes.rollout import Rollout, SamplingConfig, policy_logps, rollout

Batch = dict[str, torch.Tensor]


class ValueModel(nn.Module):
    """A causal LM with a linear value head; ``forward`` gives (rows, seq): position t holds the value of the
    state before token t (the head on hidden state t-1), position 0 holds 0."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(hidden_size_of(lm), 1, device=next(lm.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        values = self.value_head(final_hidden(self.lm, input_ids, attention_mask)).squeeze(-1).float()
        return torch.cat([values.new_zeros(values.size(0), 1), values[:, :-1]], dim=1)


@dataclass(frozen=True)
class ValueLoss:
    """0.5 x max((V - R)^2, (V_clip - R)^2) per completion token, V_clip = old + clip(V - old, -c, c)."""

    clip: float = 0.2

    count_tokens = staticmethod(count_completion_tokens)

    def __call__(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        old, returns, mask = batch["old_values"], batch["returns"], batch["completion_mask"]
        clipped = old + torch.clamp(outputs - old, -self.clip, self.clip)
        per_token = 0.5 * torch.maximum((outputs - returns) ** 2, (clipped - returns) ** 2)
        return (per_token * mask).sum(), count_completion_tokens(batch)


def token_rewards(
    scores: torch.Tensor, *, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (rows, seq): -kl_coef x (logp - ref_logp) on completion tokens, the score on the last."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (mask * (positions + 1)).argmax(dim=1)  # each row's last completion token
    rewards[torch.arange(mask.size(0)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens: (advantages, returns), (rows, seq).

    delta_t = r_t + gamma V_{t+1} - V_t (V past the last completion token is 0);
    A_t = delta_t + gamma lambda A_{t+1}; returns = A + V. Zero outside ``mask``.
    """
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.size(0))
    next_advantage = rewards.new_zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * live
        next_value = torch.where(live > 0, values[:, t], next_value * 0)
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PPOSettings:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    samples_per_prompt: int = 1
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    ppo_epochs: int = 4

    def __post_init__(self) -> None:
        check_ppo(self)

    @classmethod
    def from_section(cls, section: PPOSection, *, sampling: SamplingConfig) -> PPOSettings:
        """The settings a `plait finetune` [ppo] table gives (its PPO_FIELDS as they are)."""
        return cls(sampling=sampling, **{name: getattr(section, name) for name in PPO_FIELDS})


@torch.no_grad()
def ppo_batch(
    actor: nn.Module,
    critic: nn.Module,
    reference: nn.Module,
    reward_fn: Callable[[Rollout], torch.Tensor],
    prompts: Sequence[Sequence[int]],
    *,
    first_index: int,
    settings: PPOSettings,
    eos_id: int,
) -> tuple[Batch, torch.Tensor]:
    """The experience of one iteration for ``prompts`` (this rank's share): (batch for both losses, scores)."""
    sampled = rollout(
        actor,
        prompts,
        num_samples=settings.samples_per_prompt,
        first_index=first_index,
        sampling=settings.sampling,
        eos_id=eos_id,
    )
    scores = reward_fn(sampled).float().to(sampled.input_ids.device)  # a sandbox's scores come on the CPU
    batch = sampled.batch()
    mask = batch["completion_mask"]
    ref_logps = policy_logps(reference, batch)
    critic_was_training = critic.training
    values = critic.eval()(batch["input_ids"], batch["attention_mask"]) * mask
    critic.train(critic_was_training)
    rewards = token_rewards(scores, logps=sampled.logps, ref_logps=ref_logps, mask=mask, kl_coef=settings.kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma=settings.gamma, lam=settings.lam)
    batch.update(advantages=advantages, returns=returns, old_values=values)
    return batch, scores


def reward_model_fn(model: RewardModel) -> Callable[[Rollout], torch.Tensor]:
    """A trained reward model (`plait.recipes.reward.RewardModel`, frozen) as PPO's reward: each row's score at
    its last real token (the end token, or the last sampled one)."""
    model.eval().requires_grad_(False)
    return lambda sampled: model.score(sampled.input_ids, sampled.attention_mask)


def refresh(replica: nn.Module, engine: object) -> nn.Module:
    """``replica`` loaded with the engine's current whole weights (a collective: every rank calls it)."""
    replica.load_state_dict(engine.model_state_dict())  # type: ignore[attr-defined]
    return replica


@dataclass
class PPOModels:
    """The four models and the two replicas PPO samples and scores with (see the module docstring)."""

    actor: object  # plait Engine
    critic: object  # plait Engine
    actor_replica: nn.Module
    critic_replica: nn.Module
    reference: nn.Module
    reward_fn: Callable[[Rollout], torch.Tensor]


def ppo_iteration(
    models: PPOModels, prompts: Sequence[Sequence[int]], *, first_index: int, settings: PPOSettings, eos_id: int
) -> dict[str, object]:
    """One PPO iteration on this rank's ``prompts``: rollout, scores, GAE, then ppo_epochs steps of each engine."""
    actor = refresh(models.actor_replica, models.actor)
    critic = refresh(models.critic_replica, models.critic)
    batch, scores = ppo_batch(
        actor,
        critic,
        models.reference,
        models.reward_fn,
        prompts,
        first_index=first_index,
        settings=settings,
        eos_id=eos_id,
    )
    policy_losses, value_losses = [], []
    for _ in range(settings.ppo_epochs):
        policy_losses.append(models.actor.train_step(batch).loss.item())  # type: ignore[attr-defined]
        value_losses.append(models.critic.train_step(batch).loss.item())  # type: ignore[attr-defined]
    tokens = int(batch["attention_mask"].sum())  # this rank's rollout tokens, prompts and responses
    return {"scores": scores, "policy_losses": policy_losses, "value_losses": value_losses, "tokens": tokens}


def policy_loss_for(settings: PPOSettings) -> PolicyLoss:
    return PolicyLoss(clip=settings.clip, kl_coef=0.0)


def value_loss_for(settings: PPOSettings) -> ValueLoss:
    return ValueLoss(clip=settings.value_clip)
