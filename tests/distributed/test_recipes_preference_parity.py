"""The reward model (dp=2) and DPO (dp=2 x ZeRO-1, and tp=2 on vocab-sharded logits) against one plain
process: 10 fp32 steps, the loss at every step within 1e-5 relative, final weights allclose(1e-5, 1e-6)."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.recipes.dpo import DPOLoss, SimPOLoss, with_reference_logps
from plait.recipes.reward import RewardModel, pairwise_loss
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity, optimizer, scheduler

STEPS = 10
PAIRS = 4  # per global batch: 8 rows, chosen at 2i and rejected at 2i+1
SEQ = 16
BETA = 0.5  # larger than the usual 0.1 so ten steps move the policy well away from the reference


def make_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """Random pairs, right-padded: a shared prompt of 3-6 tokens, a chosen response of 4-10 tokens from the
    vocabulary's first eighth and a rejected one from its second (a preference the models can learn)."""
    gen = torch.Generator().manual_seed(4321)
    batches = []
    for _ in range(STEPS):
        input_ids = torch.zeros(2 * PAIRS, SEQ, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for pair in range(PAIRS):
            prompt = torch.randint(1, vocab_size // 4, (int(torch.randint(3, 7, (), generator=gen)),), generator=gen)
            for row, low in ((2 * pair, 1), (2 * pair + 1, vocab_size // 8)):
                size = int(torch.randint(4, 11, (), generator=gen))
                response = torch.randint(low, low + vocab_size // 8, (size,), generator=gen)
                ids = torch.cat([prompt, response])
                input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
                labels[row, len(prompt) : len(ids)] = response
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def build_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build("tiny", max_seq_len=SEQ)


def build_reward() -> torch.nn.Module:
    return RewardModel(build_policy())  # the head's init draws from the same seeded RNG, after the LM's


def recipe_batches(recipe: str) -> list[dict[str, torch.Tensor]]:
    """Each step's global batch; for DPO with the reference's log-probs, computed once from the initial policy."""
    batches = make_batches(512)
    if recipe != "dpo":
        return batches
    reference = build_policy()
    return [with_reference_logps(reference, batch) for batch in batches]


MODELS = {"reward": build_reward, "dpo": build_policy, "simpo": build_policy}
LOSSES = {"reward": pairwise_loss, "dpo": DPOLoss(beta=BETA), "simpo": SimPOLoss(beta=2.0, gamma=0.5)}
PLANS = {
    "reward": {"dp": 2, "bucket_mb": 0.01},
    "dpo": {"dp": 2, "zero": 1, "microbatches": 2, "bucket_mb": 0.01},  # one pair per micro-batch
    "dpo-tp2": {"tp": 2},  # per-token log-probs from each rank's vocabulary slice
    "simpo": {"dp": 2, "zero": 2, "bucket_mb": 0.01},
}


def train_plan(rank: int, world_size: int, recipe: str, plan: dict):
    model = MODELS[recipe]()
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=LOSSES[recipe],
        plan=plait.Plan(**plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    rows = 2 * PAIRS // engine.dp_size
    losses = []
    for batch in recipe_batches(recipe):
        shard = {key: value[engine.dp_rank * rows : (engine.dp_rank + 1) * rows] for key, value in batch.items()}
        losses.append(engine.train_step(shard).loss.item())
    return losses, engine.model_state_dict()


def reference(recipe: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = MODELS[recipe]()
    losses = train_reference(
        model,
        recipe_batches(recipe),
        optimizer=optimizer,
        loss_fn=LOSSES[recipe],
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return losses, model.state_dict()


@pytest.mark.parametrize(
    ("recipe", "plan"), [("reward", "reward"), ("dpo", "dpo"), ("dpo", "dpo-tp2"), ("simpo", "simpo")]
)
def test_preference_recipe_matches_one_process(recipe: str, plan: str) -> None:
    expected = reference(recipe)
    assert expected[0][-1] < expected[0][0], "the recipe should learn in ten steps, or parity shows little"
    assert_parity(run_ranks(train_plan, 2, recipe, PLANS[plan], timeout_s=120), expected)
