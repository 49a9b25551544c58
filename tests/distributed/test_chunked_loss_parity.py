"""The chunked cross entropy (hidden states and head weight, never the whole logits) under tp's
vocab-parallel head (with and without sequence parallel), dp ZeRO-2 and ZeRO-3 and pp (whose stages give logits,
so the loss takes causal_lm's path), against one plain process with the plain loss."""

from __future__ import annotations

import pytest

import plait
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import assert_parity, optimizer, scheduler, train_every_step
from tests.distributed.test_tensor_parity import MODELS, build, reference

CHUNK = 24  # tokens: each rank's 256-token step runs 11 chunks, the last one partial


def train_chunked(rank: int, world_size: int, model: str, plan: dict):
    net = build(model)
    loss_fn = plait.losses.ChunkedCausalLM(CHUNK)
    engine = plait.boost(
        net, optimizer=optimizer, loss_fn=loss_fn, plan=plait.Plan(**plan), lr_scheduler=scheduler, max_grad_norm=1.0
    )
    return train_every_step(engine, net.config.vocab_size)


PLANS = {
    "tp2": {"tp": 2},
    "tp2-sp": {"tp": 2, "sequence_parallel": True},
    "dp2-zero2": {"dp": 2, "zero": 2, "bucket_mb": 0.01},  # gpt2's head is tied: its gradient has two sources
    "dp2-zero3": {"dp": 2, "zero": 3, "bucket_mb": 0.01},  # the head gathered for the loss inside its call
    "pp2": {"pp": 2, "microbatches": 2},  # stages return logits: causal_lm's path
}


@pytest.mark.parametrize(
    ("model", "plan"),
    [
        ("gpt2", "tp2"),
        ("llama-gqa", "tp2-sp"),
        ("gpt2", "dp2-zero2"),
        ("gpt2", "dp2-zero3"),
        ("llama-gqa", "dp2-zero3"),
        ("gpt2", "pp2"),
    ],
)
def test_chunked_loss_matches_one_process(model: str, plan: str) -> None:
    assert model in MODELS
    assert_parity(run_ranks(train_chunked, 2, model, PLANS[plan]), reference(model))
