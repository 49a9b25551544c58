"""The config tables of the RL recipes: [grpo] and [ppo] in a `plait finetune` TOML.

    [recipe]
    kind = "grpo"
    [grpo]
    group = 4                  # completions per prompt
    max_new_tokens = 48
    kl_coef = 0.04

`train.global_batch` counts prompts per step (all dp ranks together); a GRPO step is one rollout and
one optimizer step, a PPO step one rollout and `ppo_epochs` optimizer steps of actor and critic.
Light on imports: `plait.recipes.config` reads these classes.
"""

from __future__ import annotations

from dataclasses import dataclass

REWARDS = ("verifiable", "model")  # "model": [ppo] only, a saved reward model at reward_path


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# The [ppo] fields plait.recipes.ppo.PPOSettings takes as they are (PPOSettings.from_section).
PPO_FIELDS = ("samples_per_prompt", "kl_coef", "gamma", "lam", "clip", "value_clip", "ppo_epochs")


def check_ppo(values: object) -> None:
    """The checks of PPO's settings, shared by [ppo] (at config load) and PPOSettings (in Python)."""
    gamma, lam = values.gamma, values.lam  # type: ignore[attr-defined]
    _require(
        0 <= gamma <= 1 and 0 <= lam <= 1, f"gamma={gamma}, lam={lam}: both are discounts in [0, 1], e.g. 1.0 and 0.95"
    )
    epochs, samples = values.ppo_epochs, values.samples_per_prompt  # type: ignore[attr-defined]
    _require(epochs >= 1 and samples >= 1, "ppo_epochs and samples_per_prompt must be >= 1, e.g. 4 and 1")
    kl_coef, value_clip = values.kl_coef, values.value_clip  # type: ignore[attr-defined]
    _require(kl_coef >= 0 and value_clip > 0, f"kl_coef={kl_coef} must be >= 0 and value_clip={value_clip} > 0")


@dataclass
class RolloutSection:
    """Sampling and the sandboxed verifiable reward, shared by [grpo] and [ppo]."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 50
    sandbox_cpu_s: int = 2
    sandbox_wall_s: float = 6.0
    reward: str = "verifiable"  # the graded doctest reward (plait.recipes.sandbox.graded_reward), or "model"

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}: sample at least 1 token, e.g. 48")
        _require(self.temperature > 0, f"temperature={self.temperature}: rollouts sample; use > 0, e.g. 1.0")
        _require(self.top_k >= 1, f"top_k={self.top_k}: use at least 1, e.g. 50")
        _require(self.sandbox_cpu_s >= 1 and self.sandbox_wall_s > 0, "sandbox_cpu_s >= 1 and sandbox_wall_s > 0")
        _require(self.reward in REWARDS, f"reward={self.reward!r}: choose one of {', '.join(REWARDS)}")


@dataclass
class GRPOSection(RolloutSection):
    """[grpo]: ``group`` completions per prompt, clipped policy gradient plus kl_coef x k3 KL to the base."""

    group: int = 4
    clip: float = 0.2
    kl_coef: float = 0.04

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.reward == "verifiable",
            f'reward={self.reward!r}: GRPO scores with the doctest reward; set reward="verifiable" '
            '(a learned reward model is [ppo] reward="model")',
        )
        _require(self.group >= 2, f"group={self.group}: GRPO compares completions of a prompt; use >= 2, e.g. 4")
        _require(0 < self.clip < 1, f"clip={self.clip}: use a fraction in (0, 1), e.g. 0.2")
        _require(self.kl_coef >= 0, f"kl_coef={self.kl_coef}: use >= 0, e.g. 0.04")


@dataclass
class PPOSection(RolloutSection):
    """[ppo]: per-token KL in the reward, GAE (gamma, lam), clipped policy and value losses, ppo_epochs."""

    samples_per_prompt: int = 1
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    ppo_epochs: int = 4
    critic_lr_ratio: float = 2.0  # the critic's learning rate over train.lr
    reward_path: str = ""  # reward="model": a checkpoint of a recipe.kind="reward" run (same base)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            (self.reward == "model") == (self.reward_path != ""),
            f'reward={self.reward!r}, reward_path={self.reward_path!r}: reward="model" reads reward_path (a '
            'recipe.kind="reward" checkpoint, e.g. "runs/reward/checkpoints/step-000100"); "verifiable" takes none',
        )
        check_ppo(self)
        _require(self.critic_lr_ratio > 0, f"critic_lr_ratio={self.critic_lr_ratio}: use > 0, e.g. 2.0")
