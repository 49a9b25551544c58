"""Context parallel (plan.cp) against one plain process: same losses every step, same final weights."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.train.reference import train_reference
from tests.distributed import test_documents_parity as documents
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import (
    assert_parity,
    fresh_model,
    optimizer,
    reference_run,
    scheduler,
    train_every_step,
)

PLANS = {
    "cp2": (2, {"cp": 2}),
    "cp4": (4, {"cp": 4}),
    "dp2-cp2-zero3": (4, {"dp": 2, "cp": 2, "zero": 3}),
    "cp2-tp2": (4, {"cp": 2, "tp": 2}),
    "cp2-tp2-sp-zero1": (4, {"cp": 2, "tp": 2, "sequence_parallel": True, "zero": 1}),
    "cp2-pp2": (4, {"cp": 2, "pp": 2, "microbatches": 4}),
    "cp2-recompute": (2, {"cp": 2, "recompute": "full", "microbatches": 2}),
}


def train_plan(rank: int, world_size: int, preset: str, plan: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model(preset)
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=plan.pop("dp", -1), bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return train_every_step(engine, model.config.vocab_size)


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple]:
    return {preset: reference_run(preset) for preset in ("tiny", "tiny-llama")}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
@pytest.mark.parametrize("plan", ["cp2", "cp4"])
def test_context_parallel_matches_one_process(plan: str, preset: str, reference: dict) -> None:
    world_size, fields = PLANS[plan]
    assert_parity(run_ranks(train_plan, world_size, preset, dict(fields)), reference[preset])


@pytest.mark.parametrize("plan", ["dp2-cp2-zero3", "cp2-tp2", "cp2-tp2-sp-zero1", "cp2-pp2", "cp2-recompute"])
def test_context_parallel_composes(plan: str, reference: dict) -> None:
    world_size, fields = PLANS[plan]
    assert_parity(run_ranks(train_plan, world_size, "tiny-llama", dict(fields)), reference["tiny-llama"])


@pytest.fixture(scope="module")
def documents_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model("tiny-llama")
    kwargs = dict(optimizer=optimizer, loss_fn=plait.losses.causal_lm, lr_scheduler=scheduler, max_grad_norm=1.0)
    losses = train_reference(model, documents.make_batches(model.config.vocab_size), **kwargs)
    return losses, model.state_dict()


@pytest.mark.parametrize("plan", [{"cp": 2}, {"cp": 2, "dp": 2, "zero": 2}], ids=["cp2", "dp2-cp2-zero2"])
def test_packed_documents_under_context_parallel(plan: dict, documents_reference: tuple) -> None:
    """Rows of several documents (per-document positions and masks): the ring masks each key block by
    the tokens' documents, from their global positions."""
    world_size = 2 * plan.get("dp", 1)
    assert_parity(run_ranks(documents.train_plan, world_size, plan), documents_reference)
