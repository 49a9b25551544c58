"""An MoE GPT under plain data parallel and ZeRO-3 against one process whose routing groups are the
ranks' micro-batches (test_parity's batches, 20 steps, AdamW eps 1e-6, clipping)."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.models import build
from plait.moe import set_routing_groups
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import SEQ, assert_parity, optimizer, reference_run, scheduler, train_every_step

PRESET = "switch-tiny"  # top-1 with capacity 1.25: drops depend on the routing groups


def moe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build(PRESET, max_seq_len=SEQ, moe_z_loss_weight=1e-3)


def train_plan(rank: int, world_size: int, zero: int, microbatches: int):
    model = moe_model()
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=world_size, zero=zero, microbatches=microbatches, bucket_mb=0.01),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return train_every_step(engine, model.config.vocab_size)


def grouped_reference(num_groups: int):
    def make() -> torch.nn.Module:
        model = moe_model()
        set_routing_groups(model, num_groups)
        return model

    return make


@pytest.mark.parametrize(("zero", "microbatches"), [(0, 1), (3, 1), (3, 2)])
def test_moe_data_parallel_matches_one_process_with_routing_groups(zero: int, microbatches: int) -> None:
    results = run_ranks(train_plan, 2, zero, microbatches)
    assert_parity(results, reference_run(grouped_reference(2 * microbatches)))
