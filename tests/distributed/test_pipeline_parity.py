"""Pipeline parallel: every schedule at pp=2 and pp=4, and 3D (dp x tp x pp) on 8 ranks, against one process."""

from __future__ import annotations

import pytest
import torch

import plait
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import (
    assert_parity,
    make_batches,
    optimizer,
    reference_run,
    scheduler,
    shard_of,
    train_every_step,
)

SEQ = 16


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return plait.models.build("tiny", max_seq_len=SEQ, num_layers=8)


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    return reference_run(build)


def train_pp(rank: int, world_size: int, plan_kwargs: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build()
    plan = plait.Plan(**{"bucket_mb": 0.01, "microbatches": 4, **plan_kwargs})
    engine = plait.boost(
        model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    assert engine.pipeline is not None
    return train_every_step(engine, model.config.vocab_size)


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize(("schedule", "chunks"), SCHEDULES)
def test_each_schedule_matches_one_process(schedule: str, chunks: int, pp: int) -> None:
    plan = {"dp": 1, "pp": pp, "pp_schedule": schedule, "pp_chunks": chunks}
    assert_parity(run_ranks(train_pp, pp, plan, timeout_s=120), reference())


@pytest.mark.parametrize(("schedule", "zero"), [("1f1b", 1), ("zb-h1", 0)])
def test_3d_parallel_on_8_ranks_matches_one_process(schedule: str, zero: int) -> None:
    # 2 micro-batches: each stage still warms up, pairs a forward with a backward and cools down (the
    # schedules' longer runs are test_each_schedule's); each one more costs 8 ranks on 2 cores ~2.5 s
    plan = {"dp": 2, "tp": 2, "pp": 2, "pp_schedule": schedule, "zero": zero, "sequence_parallel": True}
    assert_parity(run_ranks(train_pp, 8, {**plan, "microbatches": 2}, timeout_s=100), reference())


def peak_activations(rank: int, world_size: int, schedule: str) -> int:
    model = build()
    plan = plait.Plan(dp=1, pp=world_size, microbatches=8, pp_schedule=schedule)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    engine.train_step(make_batches(model.config.vocab_size)[0])
    return engine.pipeline.runner.peak_in_flight


def test_gpipe_holds_every_microbatch_and_1f1b_at_most_p() -> None:
    assert run_ranks(peak_activations, 4, "gpipe") == [8, 8, 8, 8]
    assert run_ranks(peak_activations, 4, "1f1b") == [4, 3, 2, 1]  # p - rank: never more than p


@pytest.mark.parametrize(
    "plan",
    [
        {"pp_schedule": "1f1b"},
        {"pp_schedule": "zb-h1"},
        {"pp_schedule": "interleaved", "pp_chunks": 2},
        {"pp_schedule": "1f1b", "offload_optimizer": "cpu", "offload_gradients": "cpu"},
    ],
    ids=["1f1b", "zb-h1", "interleaved", "1f1b-offload"],
)
@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_and_3_under_a_pipeline_match_one_process(plan: dict, zero: int) -> None:
    """Each stage's gradients accumulate over the micro-batches and are reduce-scattered once over its dp
    group; under ZeRO-3 each unit is gathered around every micro-batch's forward and backward."""
    assert_parity(run_ranks(train_pp, 4, {"dp": 2, "pp": 2, "zero": zero, **plan}, timeout_s=120), reference())


@pytest.mark.parametrize(
    "plan",
    [
        {"pp": 2, "pp_schedule": "1f1b"},
        {"pp": 2, "pp_schedule": "interleaved", "pp_chunks": 2},
        {"pp": 2, "pp_schedule": "zb-h1"},
        {"pp": 1},
    ],
    ids=["1f1b", "interleaved", "zb-h1", "accumulation"],
)
def test_zero_3_gathering_once_per_step_matches_one_process(plan: dict) -> None:
    plan = {"dp": 2, "zero3_gather": "step", **plan}
    assert_parity(run_ranks(train_pp_or_not, 2 * plan["pp"], plan), reference())


@pytest.mark.parametrize(
    "plan", [{"pp_schedule": "1f1b"}, {"pp_schedule": "interleaved", "pp_chunks": 2}], ids=["1f1b", "interleaved"]
)
def test_zero_3_gathering_per_microbatch_under_a_pipeline_matches_one_process(plan: dict) -> None:
    plan = {"dp": 2, "pp": 2, "zero3_gather": "microbatch", **plan}
    assert_parity(run_ranks(train_pp_or_not, 4, plan), reference())


@pytest.mark.parametrize(
    ("zero", "plan"),
    [(3, {"pp_schedule": "1f1b"}), (2, {"pp_schedule": "interleaved", "pp_chunks": 2}), (3, {"pp_schedule": "zb-h1"})],
    ids=["zero3-1f1b", "zero2-interleaved", "zero3-zb-h1"],
)
def test_zero_under_pp_4_matches_one_process(zero: int, plan: dict) -> None:
    plan = {"dp": 2, "pp": 4, "zero": zero, **plan}
    assert_parity(run_ranks(train_pp, 8, plan, timeout_s=150), reference())


def train_pp_or_not(rank: int, world_size: int, plan_kwargs: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build()
    plan = plait.Plan(bucket_mb=0.01, microbatches=4, zero=3, **plan_kwargs)
    engine = plait.boost(
        model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    return train_every_step(engine, model.config.vocab_size)


def gathered_per_step(rank: int, world_size: int, mode: str) -> tuple[int, int]:
    """All-gather volume of one step on this rank, and the bytes of its stage's units."""
    model = build()
    plan = plait.Plan(dp=2, pp=2, zero=3, microbatches=4, zero3_gather=mode)
    engine = plait.boost(model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan)
    batch = shard_of(make_batches(model.config.vocab_size)[0], engine)
    engine.train_step(batch)
    engine.comm.reset()
    engine.train_step(batch)
    unit_bytes = sum(unit.layout.padded_numel * unit.full.element_size() for unit in engine.data_parallel.units)
    return engine.comm.bytes_by_kind["all_gather"], unit_bytes


def test_zero_3_step_mode_gathers_each_unit_once_a_step_and_microbatch_mode_twice_per_microbatch() -> None:
    for gathered, unit_bytes in run_ranks(gathered_per_step, 4, "step"):
        assert gathered == unit_bytes
    for gathered, unit_bytes in run_ranks(gathered_per_step, 4, "microbatch"):
        assert gathered == 2 * 4 * unit_bytes
