"""The chunked cross entropy (hidden states and head weight, never the whole logits) under tp's
vocab-parallel head, against one plain process with the plain loss."""

from __future__ import annotations

import pytest

import plait
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity, optimizer, scheduler, train_every_step
from tests.distributed.test_tensor_parity import MODELS, build, reference

CHUNK = 24  # tokens: each rank's 256-token step runs 11 chunks, the last one partial


def train_chunked(rank: int, world_size: int, model: str, sp: bool):
    net = build(model)
    plan = plait.Plan(tp=world_size, sequence_parallel=sp)
    loss_fn = plait.losses.ChunkedCausalLM(CHUNK)
    engine = plait.boost(
        net, optimizer=optimizer, loss_fn=loss_fn, plan=plan, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    assert "lm_head" in engine.tensor_parallel
    return train_every_step(engine, net.config.vocab_size)


@pytest.mark.parametrize(("model", "sp"), [("gpt2", False), ("llama-gqa", True)])
def test_tp2_chunked_loss_matches_one_process(model: str, sp: bool) -> None:
    assert model in MODELS
    assert_parity(run_ranks(train_chunked, 2, model, sp), reference(model))
