"""ZeRO-0 in bf16 casts its 16-bit gradients straight into the fp32 gradient buffer and sums them there
(no temporary, no copy back, the buffer not zeroed between steps): it must step exactly as ZeRO-1,
whose sharded reduction still casts into a temporary, over steps with gradient accumulation."""

from __future__ import annotations

import torch

import plait
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import fresh_model, make_batches, optimizer, shard_of


def train(rank: int, world_size: int, zero: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = fresh_model("tiny")
    plan = plait.Plan(zero=zero, precision="bf16", microbatches=2, bucket_mb=0.01)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    losses = [engine.train_step(shard_of(b, engine)).loss.item() for b in make_batches(model.config.vocab_size)[:6]]
    return losses, engine.model_state_dict()


def test_bf16_zero0_steps_as_zero1() -> None:
    losses0, weights0 = run_ranks(train, 2, 0)[0]
    losses1, weights1 = run_ranks(train, 2, 1)[0]
    assert losses0 == losses1
    for name, value in weights0.items():
        assert torch.equal(value, weights1[name]), name
