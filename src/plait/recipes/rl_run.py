"""`plait finetune` for the RL recipes: recipe.kind = "grpo" or "ppo", with the verifiable reward.

Prompts are the corpus's doctest-carrying functions of training documents (`plait.recipes.data.verifiable`,
kept where the true body passes its doctests in the sandbox and the prompt leaves room for the completion);
step s takes train.global_batch of them in order (wrapping), split over dp ranks in contiguous shares.
The loop is `plait.recipes.loop`'s (metrics line, metrics.csv, checkpoints); a step here is one rollout
(the actor's weights gathered once into a plain replica, sampled under no_grad) then the updates. PPO's
critic is a second engine on the same plan (its learning rate train.lr x critic_lr_ratio); the reference
is a frozen copy of the base on every rank. The loss logged is the policy loss; the mean reward is logged
beside it. Not evaluated on held-out tasks: the validation documents hold none.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.launch import is_main_rank
from plait.recipes.base import BaseTokenizer, base_window, checkpoint_record, load_base
from plait.recipes.config import FinetuneConfig
from plait.recipes.data.verifiable import VerifiableTask, cached_verified_tasks, verifiable_reward
from plait.recipes.grpo import PolicyLoss, grpo_batch
from plait.recipes.loop import (
    CheckpointRecord,
    FinetuneRun,
    FinetuneSummary,
    RecipeData,
    build_engine,
    run_to_end,
)
from plait.recipes.ppo import (
    PPOModels,
    PPOSettings,
    ValueModel,
    ppo_iteration,
    refresh,
    reward_model_fn,
    value_loss_for,
)
from plait.recipes.reward_checkpoint import load_reward_model
from plait.recipes.rl_config import RolloutSection
from plait.recipes.rollout import SamplingConfig
from plait.recipes.sandbox import SandboxLimits
from plait.train.decoding import model_device
from plait.train.logs import DEFAULT_COLUMNS, MetricsLog


def rl_tasks(config: FinetuneConfig, tokenizer: BaseTokenizer, *, window: int | None) -> list[VerifiableTask]:
    """The verifiable prompts whose prompt + max_new_tokens fit ``window`` (the base's trained length,
    `plait.recipes.base.base_window`; None: no bound), refused in one line when none does."""
    section: RolloutSection = config.section(config.recipe.kind)
    tasks = verified_tasks(config)
    lengths = [len(tokenizer.encode(t.prompt)) for t in tasks]
    fitting = [t for t, n in zip(tasks, lengths, strict=True) if window is None or n + section.max_new_tokens <= window]
    if not fitting:
        raise ValueError(_none_fits(config, window=window, shortest=min(lengths, default=0)))
    return fitting[: config.data.max_examples] if config.data.max_examples else fitting


def _none_fits(config: FinetuneConfig, *, window: int | None, shortest: int) -> str:
    kind, corpus = config.recipe.kind, config.data.corpus
    max_new = config.section(kind).max_new_tokens
    if window is None or shortest == 0:  # no bound, or no task at all
        return f"no doctest-carrying function of data.corpus={corpus!r} passes its doctests; use another corpus"
    room = window - shortest
    fix = f"lower [{kind}].max_new_tokens to {room} or fewer" if room > 0 else "every prompt alone fills it"
    return (
        f"no doctest-carrying function of data.corpus={corpus!r} fits {window} tokens with max_new_tokens={max_new} "
        f"({window}: the length base.path was trained at, at most its context, where positions past it never had "
        f"a loss); {fix}, or fine-tune the base at a longer data.seq_len first"
    )


def verified_tasks(config: FinetuneConfig) -> list[VerifiableTask]:
    """The training documents' tasks whose true body passes in the sandbox (cached: see the data module)."""
    data, section = config.data, config.section(config.recipe.kind)
    return cached_verified_tasks(
        data.corpus, split="train", val_fraction=data.val_fraction, limits=limits_of(section), cache_dir=data.cache_dir
    )


def limits_of(section: RolloutSection) -> SandboxLimits:
    return SandboxLimits(cpu_s=section.sandbox_cpu_s, wall_s=section.sandbox_wall_s)


def sampling_of(section: RolloutSection, *, seed: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=section.max_new_tokens, temperature=section.temperature, top_k=section.top_k, seed=seed
    )


class RLRun(FinetuneRun):
    """FinetuneRun whose step is a rollout of this rank's prompts followed by the recipe's updates."""

    def __init__(
        self,
        config: FinetuneConfig,
        model: nn.Module,
        *,
        loss_fn: Any,
        tasks: list,
        tokenizer: Any,
        record: CheckpointRecord,
    ) -> None:
        data = RecipeData(train_batch=lambda *_: {}, eval_batches=lambda *_: [], tokens_per_step=0)
        self.replica, self.reference = copy.deepcopy(model), copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(config, model, loss_fn=loss_fn, data=data, record=record)
        for held in (self.replica, self.reference):
            held.to(self.device)  # sampled and scored where the engine runs
        self.tasks, self.tokenizer = tasks, tokenizer
        self.section = config.section(config.recipe.kind)
        self.metrics_log.close()  # reopened with the recipe's own columns
        columns = (*DEFAULT_COLUMNS, "reward", "value_loss")
        self.metrics_log = MetricsLog(self.out_dir, enabled=is_main_rank(), columns=columns)

    def evaluate(self) -> float | None:
        return None

    def my_tasks(self, *, per_prompt: int) -> tuple[list[VerifiableTask], list[list[int]], int]:
        count, size = self.config.train.global_batch, self.engine.dp_size
        share = count // size
        chosen = [self.tasks[(self.step * count + k) % len(self.tasks)] for k in range(count)]
        mine = chosen[self.engine.dp_rank * share : (self.engine.dp_rank + 1) * share]
        first = (self.step * count + self.engine.dp_rank * share) * per_prompt
        return mine, [self.tokenizer.encode(t.prompt) for t in mine], first

    def train_one_step(self) -> dict[str, Any]:
        """The recipe's step timed whole (rollout, scoring, updates); tokens/s counts every rank's rollout
        tokens (prompts and responses, padding not) over that time."""
        start = time.perf_counter()
        values, tokens = self.rl_step()
        seconds = time.perf_counter() - start
        count = torch.tensor(float(tokens), dtype=torch.double, device=model_device(self.replica))  # NCCL: on the GPU
        if dist.is_initialized():
            dist.all_reduce(count, group=self.mesh.group("dp"))
        self.throughput.record(self.step, int(count), seconds)
        return {**values, "step_s": seconds}

    def rl_step(self) -> tuple[dict[str, Any], int]:
        """One rollout and its updates on this rank: (logged values, this rank's rollout tokens)."""
        raise NotImplementedError

    def held_modules(self) -> list[nn.Module]:
        """The plain models this rank keeps beside its engine: the sampling replica and the reference."""
        return [self.replica, self.reference]

    def state_bytes(self) -> int:
        return super().state_bytes() + module_bytes(self.held_modules())

    def record_step(self, losses: list[float], rewards: torch.Tensor) -> dict[str, Any]:
        self.losses.append(losses[-1])
        total = torch.stack([rewards.double().sum(), rewards.new_tensor(rewards.numel(), dtype=torch.double)])
        if dist.is_initialized():  # the mean over every rank's samples, as one process would log it
            dist.all_reduce(total, group=self.mesh.group("dp"))
        reward = float(total[0] / total[1])
        return {"loss": losses[-1], "reward": reward, "lr": self.engine.optimizer.param_groups[0]["lr"]}


def module_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer storages of ``modules``."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for m in modules
        for t in (*m.parameters(), *m.buffers())
    }
    return sum(storages.values())


class GRPORun(RLRun):
    def rl_step(self) -> tuple[dict[str, Any], int]:
        section = self.section
        mine, prompts, first = self.my_tasks(per_prompt=section.group)
        reward_fn = verifiable_reward(mine, self.tokenizer, samples=section.group, limits=limits_of(section))
        batch, rewards = grpo_batch(
            refresh(self.replica, self.engine), self.reference, prompts, group=section.group, first_index=first,
            sampling=sampling_of(section, seed=self.config.train.seed), eos_id=self.tokenizer.eot_id, reward_fn=reward_fn,
        )  # fmt: skip
        values = self.record_step([self.engine.train_step(batch).loss.item()], rewards)
        return values, int(batch["attention_mask"].sum())


class PPORun(RLRun):
    def __init__(
        self, config: FinetuneConfig, model: nn.Module, *, reward_model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        super().__init__(config, model, **kwargs)
        # frozen, [ppo] reward="model"; None: the sandboxed doctest reward
        self.reward_model = None if reward_model is None else reward_model.to(self.device)
        section = self.section
        self.settings = PPOSettings.from_section(section, sampling=sampling_of(section, seed=config.train.seed))
        critic = ValueModel(copy.deepcopy(self.reference).requires_grad_(True).train())
        self.critic_replica = copy.deepcopy(critic)
        critic_train = dataclasses.replace(config.train, lr=config.train.lr * section.critic_lr_ratio)
        critic_config = dataclasses.replace(config, train=critic_train)
        self.critic = build_engine(critic_config, critic, loss_fn=value_loss_for(self.settings), mesh=self.mesh)

    def held_modules(self) -> list[nn.Module]:
        """Besides the actor's: the critic's engine (in state_bytes), its replica and a reward model."""
        reward = [self.reward_model] if self.reward_model is not None else []
        return [*super().held_modules(), self.critic_replica, *reward]

    def state_bytes(self) -> int:
        return super().state_bytes() + self.critic.state_bytes()["total"]

    def rl_step(self) -> tuple[dict[str, Any], int]:
        per = self.settings.samples_per_prompt
        mine, prompts, first = self.my_tasks(per_prompt=per)
        if self.reward_model is not None:
            reward_fn = reward_model_fn(self.reward_model)
        else:
            reward_fn = verifiable_reward(mine, self.tokenizer, samples=per, limits=limits_of(self.section))
        models = PPOModels(self.engine, self.critic, self.replica, self.critic_replica, self.reference, reward_fn)
        stats = ppo_iteration(models, prompts, first_index=first, settings=self.settings, eos_id=self.tokenizer.eot_id)
        values = self.record_step(stats["policy_losses"], stats["scores"])
        return {**values, "value_loss": stats["value_losses"][-1]}, stats["tokens"]


def _run(config: FinetuneConfig, run_class: type[RLRun], loss_fn: Any) -> FinetuneSummary:
    model, tokenizer = load_base(config.base.path)
    tasks = rl_tasks(config, tokenizer, window=base_window(config.base.path))  # refused before any collective
    extra_args = {"reward_model": _reward_model(config, model, tokenizer)} if run_class is PPORun else {}
    config_dict, extra = checkpoint_record(config.base.path)
    record = CheckpointRecord(config=config_dict, extra=extra)
    return run_to_end(
        config,
        lambda: run_class(
            config, model, loss_fn=loss_fn, tasks=tasks, tokenizer=tokenizer, record=record, **extra_args
        ),
    )


def _reward_model(config: FinetuneConfig, model: nn.Module, tokenizer: BaseTokenizer) -> nn.Module | None:
    """[ppo] reward="model": the saved reward model (refused here, before any collective); else None."""
    section = config.section("ppo")
    return load_reward_model(section.reward_path, model, tokenizer) if section.reward == "model" else None


def run_grpo(config: FinetuneConfig) -> FinetuneSummary:
    """recipe.kind = "grpo": group-relative policy optimisation against the sandboxed doctest reward."""
    section = config.section("grpo")
    return _run(config, GRPORun, PolicyLoss(clip=section.clip, kl_coef=section.kl_coef))


def run_ppo(config: FinetuneConfig) -> FinetuneSummary:
    """recipe.kind = "ppo": actor, critic, reference and the sandboxed doctest reward."""
    section = config.section("ppo")
    return _run(config, PPORun, PolicyLoss(clip=section.clip, kl_coef=0.0))
