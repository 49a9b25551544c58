"""Tensor (and sequence) parallel, alone and with data parallel / ZeRO, against one plain process."""

from __future__ import annotations

import pytest
import torch

import plait
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import (
    assert_parity,
    optimizer,
    reference_run,
    scheduler,
    train_every_step,
)

SEQ = 16
MODELS = {
    "gpt2": ("tiny", {}),
    "llama-gqa": ("tiny-llama", {}),  # 4 query heads, 2 kv heads
    "llama-8h": ("tiny-llama", {"num_heads": 8, "num_kv_heads": 4}),
}


def build(model: str) -> torch.nn.Module:
    preset, overrides = MODELS[model]
    torch.manual_seed(0)
    return plait.models.build(preset, max_seq_len=SEQ, **overrides)


def reference(model: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference_run(lambda: build(model))


def train_tp(rank: int, world_size: int, model: str, tp: int, sp: bool, zero: int, microbatches: int):
    net = build(model)
    plan = plait.Plan(
        dp=world_size // tp, tp=tp, sequence_parallel=sp, zero=zero, microbatches=microbatches, bucket_mb=0.01
    )
    engine = plait.boost(
        net, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    assert "blocks.0.attn.q_proj" in engine.tensor_parallel and "lm_head" in engine.tensor_parallel
    assert net.blocks[0].attn.num_heads == MODELS[model][1].get("num_heads", 4) // tp  # local heads
    return train_every_step(engine, net.config.vocab_size)


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize(("model", "tp"), [("gpt2", 2), ("gpt2", 4), ("llama-gqa", 2), ("llama-8h", 4)])
def test_tensor_parallel_matches_one_process(model: str, tp: int, sp: bool) -> None:
    assert_parity(run_ranks(train_tp, tp, model, tp, sp, 0, 1), reference(model))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_dp2_tp2_with_zero_matches_one_process(zero: int) -> None:
    assert_parity(run_ranks(train_tp, 4, "llama-gqa", 2, True, zero, 2), reference("llama-gqa"))
    if zero in (0, 3):
        assert_parity(run_ranks(train_tp, 4, "gpt2", 2, False, zero, 1), reference("gpt2"))
