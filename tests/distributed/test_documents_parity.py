"""Packed documents (per-document positions and attention) under ZeRO-3 and a pipeline, against one process."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.data import document_positions
from plait.train.reference import train_reference
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import GLOBAL_BATCH, STEPS, assert_parity, fresh_model, optimizer, scheduler

EOT = 0
PLANS = {
    "dp2-zero3": {"dp": 2, "zero": 3},
    "pp2-1f1b": {"dp": 1, "pp": 2, "microbatches": 4, "pp_schedule": "1f1b"},
}


def make_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """Rows of several documents: each token ends a document with probability 1/6."""
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(1, vocab_size // 4, (STEPS, GLOBAL_BATCH, 16), generator=gen)
    tokens[torch.rand(tokens.shape, generator=gen) < 1 / 6] = EOT
    return [{"input_ids": t, "labels": t.clone(), "position_ids": document_positions(t, eot_id=EOT)} for t in tokens]


def train_plan(rank: int, world_size: int, plan: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model("tiny-llama")
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    per_rank = GLOBAL_BATCH // engine.dp_size
    shard = slice(engine.dp_rank * per_rank, (engine.dp_rank + 1) * per_rank)
    batches = make_batches(model.config.vocab_size)
    losses = [engine.train_step({k: v[shard] for k, v in batch.items()}).loss.item() for batch in batches]
    return losses, engine.model_state_dict()


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model("tiny-llama")
    batches = make_batches(model.config.vocab_size)
    assert all((b["position_ids"][:, 1:] == 0).any() for b in batches)  # every step packs several documents
    kwargs = dict(optimizer=optimizer, loss_fn=plait.losses.causal_lm, lr_scheduler=scheduler, max_grad_norm=1.0)
    losses = train_reference(model, batches, **kwargs)
    unmasked = train_reference(fresh_model("tiny-llama"), [{**b, "position_ids": None} for b in batches], **kwargs)
    assert abs(unmasked[0] - losses[0]) > 1e-4  # the documents' boundaries change the loss
    return losses, model.state_dict()


@pytest.mark.parametrize("plan", list(PLANS))
def test_packed_documents_match_one_process(plan: str, reference: tuple) -> None:
    assert_parity(run_ranks(train_plan, 2, PLANS[plan]), reference)
