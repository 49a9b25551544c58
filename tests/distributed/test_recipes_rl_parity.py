"""PPO (one iteration: rollout, GAE, 10 PPO epochs of actor and critic) and GRPO (one group batch, 10 updates)
under dp=2 against one plain process, fp32: every step's loss within 1e-5 relative, final weights
allclose(1e-5, 1e-6). Each rank samples only its prompts; samples are seeded by their global index."""

from __future__ import annotations

import copy

import torch

import plait
from plait.recipes.grpo import PolicyLoss, grpo_batch
from plait.recipes.ppo import (
    PPOModels,
    PPOSettings,
    ValueModel,
    policy_loss_for,
    ppo_batch,
    ppo_iteration,
    value_loss_for,
)
from plait.recipes.rollout import Rollout, SamplingConfig
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import STEPS, assert_parity, optimizer, scheduler

SEQ = 32
EOS = 0
SETTINGS = PPOSettings(
    sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50, seed=7), samples_per_prompt=2, ppo_epochs=STEPS
)
GROUP = 4


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(99)
    return [
        torch.randint(1, 200, (int(torch.randint(3, 6, (), generator=gen)),), generator=gen).tolist() for _ in range(4)
    ]


def low_token_reward(sampled: Rollout) -> torch.Tensor:
    """The fraction of completion tokens from the vocabulary's first 64 ids (something a policy can learn)."""
    mask = sampled.completion_mask
    return ((sampled.input_ids < 64).float() * mask).sum(1) / mask.sum(1)


def actor() -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build("tiny", max_seq_len=SEQ)


def critic() -> torch.nn.Module:
    torch.manual_seed(1)
    return ValueModel(plait.models.build("tiny", max_seq_len=SEQ))


def engine(model: torch.nn.Module, loss_fn, plan: dict):
    return plait.boost(
        model, optimizer=optimizer, loss_fn=loss_fn, plan=plait.Plan(**plan), lr_scheduler=scheduler, max_grad_norm=1.0
    )


def share(rank: int, world_size: int, per_sample: int) -> tuple[list[list[int]], int]:
    every = prompts()
    count = len(every) // world_size
    return every[rank * count : (rank + 1) * count], rank * count * per_sample


def ppo_ranks(rank: int, world_size: int):
    models = PPOModels(
        actor=engine(actor(), policy_loss_for(SETTINGS), {"dp": world_size, "zero": 1, "bucket_mb": 0.01}),
        critic=engine(
            critic(), value_loss_for(SETTINGS), {"dp": world_size, "zero": 2, "microbatches": 2, "bucket_mb": 0.01}
        ),
        actor_replica=actor(),
        critic_replica=critic(),
        reference=actor().eval().requires_grad_(False),
        reward_fn=low_token_reward,
    )
    mine, first = share(rank, world_size, SETTINGS.samples_per_prompt)
    stats = ppo_iteration(models, mine, first_index=first, settings=SETTINGS, eos_id=EOS)
    return (
        (stats["policy_losses"], models.actor.model_state_dict()),
        (stats["value_losses"], models.critic.model_state_dict()),
    )


def ppo_reference():
    policy, value = actor(), critic()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    batch, _ = ppo_batch(
        policy, value, reference, low_token_reward, prompts(), first_index=0, settings=SETTINGS, eos_id=EOS
    )
    policy_losses = train_reference(
        policy,
        [batch] * STEPS,
        optimizer=optimizer,
        loss_fn=policy_loss_for(SETTINGS),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    value_losses = train_reference(
        value,
        [batch] * STEPS,
        optimizer=optimizer,
        loss_fn=value_loss_for(SETTINGS),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return (policy_losses, policy.state_dict()), (value_losses, value.state_dict())


def test_ppo_iteration_matches_one_process() -> None:
    expected_actor, expected_critic = ppo_reference()
    assert len(set(expected_actor[0])) > 1 and expected_critic[0][-1] < expected_critic[0][0]
    results = run_ranks(ppo_ranks, 2, timeout_s=180)
    assert_parity([actor_result for actor_result, _ in results], expected_actor)
    assert_parity([critic_result for _, critic_result in results], expected_critic)


GRPO_LOSS = PolicyLoss(clip=0.2, kl_coef=0.1)


def grpo_share(policy: torch.nn.Module, prompt_ids: list[list[int]], first: int):
    # a reference other than the initial policy (an earlier checkpoint, say): the KL term is live from step 0,
    # whose loss is otherwise 0 exactly (advantages sum to 0 in each group at ratio 1)
    torch.manual_seed(2)
    reference = plait.models.build("tiny", max_seq_len=SEQ).eval().requires_grad_(False)
    sampling = SETTINGS.sampling
    return grpo_batch(
        policy,
        reference,
        prompt_ids,
        group=GROUP,
        first_index=first,
        sampling=sampling,
        eos_id=EOS,
        reward_fn=low_token_reward,
    )[0]


def grpo_ranks(rank: int, world_size: int):
    mine, first = share(rank, world_size, GROUP)
    batch = grpo_share(actor(), mine, first)  # sampled by a plain replica of the policy's initial weights
    policy = engine(actor(), GRPO_LOSS, {"dp": world_size, "zero": 3, "microbatches": 2, "bucket_mb": 0.01})
    losses = [policy.train_step(batch).loss.item() for _ in range(STEPS)]
    return losses, policy.model_state_dict()


def test_grpo_matches_one_process() -> None:
    policy = actor()
    batch = grpo_share(policy, prompts(), 0)
    losses = train_reference(
        policy, [batch] * STEPS, optimizer=optimizer, loss_fn=GRPO_LOSS, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    assert losses[-1] < losses[0]
    assert_parity(run_ranks(grpo_ranks, 2, timeout_s=180), (losses, policy.state_dict()))
