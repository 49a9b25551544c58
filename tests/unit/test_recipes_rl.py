"""RL recipe pieces: GAE against a direct loop, group advantages, the rollout's seeding and log-probs, the
policy/value losses at the reference point, and the sandbox (a pass, a wrong answer, a crashing body, an
infinite loop, writes outside its directory, the network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import plait
from plait.recipes.grpo import PolicyLoss, group_advantages, k3_kl
from plait.recipes.ppo import ValueLoss, gae, token_rewards
from plait.recipes.rollout import SamplingConfig, policy_logps, rollout
from plait.recipes.sandbox import SandboxLimits, graded_reward, run_sandboxed

HEADER = 'def double(x):\n    """\n    >>> double(2)\n    4\n    """\n'
LIMITS = SandboxLimits(cpu_s=1, wall_s=3.0)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


def direct_gae(rewards, values, mask, gamma, lam):
    """Row by row over the completion's tokens only, as written in the PPO paper."""
    out = torch.zeros_like(rewards)
    for row in range(rewards.size(0)):
        steps = [t for t in range(rewards.size(1)) if mask[row, t]]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[row, steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            out[row, t] = running
    return out


def test_gae_matches_a_direct_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards, values = (
        torch.randn(4, 9, generator=gen, dtype=torch.float64),
        torch.randn(4, 9, generator=gen, dtype=torch.float64),
    )
    mask = torch.zeros(4, 9, dtype=torch.float64)
    for row, (start, end) in enumerate([(2, 9), (3, 5), (1, 2), (4, 8)]):
        mask[row, start:end] = 1
    advantages, returns = gae(rewards * mask, values * mask, mask, gamma=0.9, lam=0.8)
    expected = direct_gae(rewards * mask, values * mask, mask, 0.9, 0.8)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=1e-12, atol=1e-12)


def test_token_rewards_put_the_score_on_the_last_completion_token() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1.0]])
    logps, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.5)
    rewards = token_rewards(torch.tensor([2.0, 3.0]), logps=logps * mask, ref_logps=ref * mask, mask=mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0, -0.05, 1.95, 0], [0, 0, -0.05, 2.95]]))


def test_group_advantages_normalise_within_each_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, group=4)
    first = (rewards[:4] - rewards[:4].mean()) / (rewards[:4].std() + 1e-4)
    torch.testing.assert_close(advantages[:4], first)
    assert advantages[4:].abs().max() == 0  # equal rewards: no signal
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, group=1)


def tiny_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build("tiny", max_seq_len=32)


def test_rollout_seeds_each_sample_by_its_global_index() -> None:
    model, sampling = tiny_policy(), SamplingConfig(max_new_tokens=6, seed=3)
    prompts = [[5, 6, 7], [8, 9]]
    whole = rollout(model, prompts, num_samples=2, first_index=0, sampling=sampling, eos_id=0)
    second = rollout(model, prompts[1:], num_samples=2, first_index=2, sampling=sampling, eos_id=0)
    assert torch.equal(whole.input_ids[2:, : second.input_ids.size(1)], second.input_ids)
    assert not torch.equal(whole.input_ids[0], whole.input_ids[1])  # two samples of one prompt differ
    assert whole.completion_mask[:2, :3].sum() == 0 and whole.completion_mask[2:, :2].sum() == 0
    assert whole.completion_mask[:, 3].sum() == 4
    # the returned log-probs are the policy's own, and the losses start at their reference point
    batch = whole.batch()
    torch.testing.assert_close(batch["old_logps"], policy_logps(model, batch))
    batch.update(
        advantages=torch.ones_like(batch["old_logps"]) * batch["completion_mask"], ref_logps=batch["old_logps"]
    )
    total, count = PolicyLoss(clip=0.2, kl_coef=0.1)(model(batch["input_ids"]), batch)
    torch.testing.assert_close(total / count, torch.tensor(-1.0), rtol=1e-5, atol=1e-5)  # ratio 1, KL 0
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() > 0


def test_value_loss_is_clipped_around_the_old_values() -> None:
    batch = {
        "old_values": torch.zeros(1, 3),
        "returns": torch.full((1, 3), 1.0),
        "completion_mask": torch.tensor([[0, 1, 1.0]]),
    }
    total, count = ValueLoss(clip=0.2)(torch.full((1, 3), 0.9), batch)  # unclipped (0.9-1)^2 < clipped (0.2-1)^2
    assert count.item() == 2 and total.item() == pytest.approx(2 * 0.5 * 0.64)


@pytest.mark.parametrize(
    ("body", "status", "reward"),
    [
        ("    return x * 2\n", "ok", 1.0),
        ("    return x + 3\n", "ok", 0.5),  # runs, wrong answer
        ("    return x / 0\n", "ok", 0.2),  # raises inside the example
        ("    return x +\n", "exception", 0.0),  # does not parse
        ("    import os\n    os.abort()\n", "crashed", 0.2),
    ],
)
def test_sandbox_scores_bodies(body: str, status: str, reward: float) -> None:
    verdict = run_sandboxed(HEADER + body, entry="double", limits=LIMITS)
    assert (verdict.status, graded_reward(verdict)) == (status, reward)


def test_sandbox_stops_an_infinite_loop() -> None:
    loop = HEADER + "    while True:\n        pass\n"
    verdict = run_sandboxed(loop, entry="double", limits=SandboxLimits(cpu_s=1, wall_s=1.5))
    assert verdict.status in ("timeout", "crashed") and graded_reward(verdict) == 0.2  # wall or CPU limit


def test_sandbox_refuses_writes_outside_its_dir_and_the_network(tmp_path) -> None:
    target = tmp_path / "escaped.txt"
    escape = HEADER + f"    open({str(target)!r}, 'w').write('x')\n    return 4\n"
    verdict = run_sandboxed(escape, entry="double", limits=LIMITS)
    assert verdict.errors == 1 and not target.exists()
    inside = HEADER + "    open('mine.txt', 'w').write('x')\n    return 4\n"
    assert run_sandboxed(inside, entry="double", limits=LIMITS).passed
    network = "import socket\n" + HEADER + "    socket.socket()\n    return 4\n"
    assert run_sandboxed(network, entry="double", limits=LIMITS).errors == 1
    assert not os.path.exists(os.path.join(os.getcwd(), "mine.txt"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("grpo.group=1", "use >= 2"), ("grpo.temperature=0", "rollouts sample"), ("grpo.reward='judge'", "choose one of")],
)
def test_grpo_config_refuses_bad_settings_in_one_line(override: str, message: str) -> None:
    from plait.recipes.config import load_finetune_config

    with pytest.raises(ValueError, match=message):
        load_finetune_config(CONFIGS / "grpo.toml", [override])
    assert load_finetune_config(CONFIGS / "ppo.toml").section("ppo").ppo_epochs == 2


def test_completion_body_stops_where_the_function_ends() -> None:
    from plait.recipes.data.verifiable import completion_body

    assert completion_body("    return 1\n\n    \ndef other():\n    pass\n") == "    return 1\n\n    \n"


def test_a_reward_model_scores_rollouts_at_their_last_real_token() -> None:
    from plait.recipes.ppo import reward_model_fn
    from plait.recipes.reward import RewardModel

    sampled = rollout(
        tiny_policy(), [[5, 6, 7]], num_samples=2, first_index=0, sampling=SamplingConfig(max_new_tokens=4), eos_id=0
    )
    reward = RewardModel(tiny_policy())
    scores = reward_model_fn(reward)(sampled)
    for row in range(2):
        length = int(sampled.attention_mask[row].sum())
        alone = reward(sampled.input_ids[row : row + 1, :length])
        torch.testing.assert_close(scores[row : row + 1], alone, rtol=1e-5, atol=1e-6)
