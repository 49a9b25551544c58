"""LAMB and LARS under ZeRO 1-3 and tensor parallel against one plain process running the same optimizer:
each parameter's trust ratio needs its whole norm, summed over the ranks that hold its pieces."""

from __future__ import annotations

import pytest

import plait
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity, fresh_model, make_batches, scheduler, shard_of

OPTIMIZERS = {
    "lamb": lambda: plait.optim.lamb(lr=2e-3, weight_decay=0.1),
    "lars": lambda: plait.optim.lars(lr=0.5, weight_decay=1e-3, trust_coeff=0.02),
}
# vectors in their own group at lr x 0.1: the group's lr must survive the plan's regrouping (ZeRO-3 only: cost)
VECTOR_LR = {
    "lars-vector-lr": lambda: plait.optim.lars(lr=0.5, weight_decay=1e-3, trust_coeff=0.02, vector_lr_ratio=0.1)
}
PLANS = {
    "zero1": {"dp": 2, "zero": 1},
    "zero2": {"dp": 2, "zero": 2},
    "zero3": {"dp": 2, "zero": 3},
    "tp2": {"dp": 1, "tp": 2},
    "dp2-tp2-zero3": {"dp": 2, "tp": 2, "zero": 3},  # 4 ranks: norms summed over both axes
}


def train_plan(rank: int, world_size: int, optimizer: str, plan: dict) -> tuple[list[float], dict]:
    model = fresh_model("tiny-llama")
    engine = plait.boost(
        model,
        optimizer={**OPTIMIZERS, **VECTOR_LR}[optimizer](),
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    losses = [engine.train_step(shard_of(b, engine)).loss.item() for b in make_batches(model.config.vocab_size)]
    return losses, engine.model_state_dict()


def reference(optimizer: str) -> tuple[list[float], dict]:
    model = fresh_model("tiny-llama")
    losses = train_reference(
        model,
        make_batches(model.config.vocab_size),
        optimizer={**OPTIMIZERS, **VECTOR_LR}[optimizer](),
        loss_fn=plait.losses.causal_lm,
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return losses, model.state_dict()


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_layerwise_optimizer_matches_one_process(optimizer: str, plan: str) -> None:
    world = PLANS[plan]["dp"] * PLANS[plan].get("tp", 1)
    assert_parity(run_ranks(train_plan, world, optimizer, PLANS[plan]), reference(optimizer))


def test_lars_vectors_at_their_own_lr_match_one_process_under_zero3() -> None:
    assert_parity(run_ranks(train_plan, 2, "lars-vector-lr", PLANS["zero3"]), reference("lars-vector-lr"))


def train_moe(rank: int, world_size: int, zero: int, tp: int) -> tuple[list[float], dict]:
    from tests.distributed.test_moe_ep import Case, make_batches, make_model

    case = Case("mixtral-tiny", world=2, ep=2, zero=zero)
    model = make_model(case)
    engine = plait.boost(
        model,
        optimizer=OPTIMIZERS["lamb"](),
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=2, ep=2, tp=tp, zero=zero, bucket_mb=0.01),
        max_grad_norm=1.0,
    )
    batches = make_batches(model.config.vocab_size, 10)
    losses = [engine.train_step(shard_of(b, engine)).loss.item() for b in batches]
    return losses, engine.model_state_dict()


@pytest.mark.parametrize(("zero", "tp"), [(0, 1), (3, 1), (0, 2)])
def test_lamb_under_expert_parallel_matches_one_process(zero: int, tp: int) -> None:
    """Each rank holds half the experts' rows of a stacked expert weight: its norm sums both halves
    (and under tp=2, both halves of each expert's width)."""
    from plait.moe import set_routing_groups
    from tests.distributed.test_moe_ep import Case, make_batches, make_model

    model = make_model(Case("mixtral-tiny", world=2, ep=2))
    set_routing_groups(model, 2)
    losses = train_reference(
        model,
        make_batches(model.config.vocab_size, 10),
        optimizer=OPTIMIZERS["lamb"](),
        loss_fn=plait.losses.causal_lm,
        max_grad_norm=1.0,
    )
    assert_parity(run_ranks(train_moe, 2 * tp, zero, tp), (losses, model.state_dict()))
