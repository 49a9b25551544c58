"""Offload against one plain process: optimizer, gradients and parameters on the host or on disk.

The same model, batches and seed as tests/distributed/test_parity.py: every step's loss within 1e-5
relative and final weights allclose(1e-5, 1e-6) (fp32), whichever tier holds which state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plait
from plait.zero.offload.placement import UnitTiers, unit_sizes, working_set_bytes
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import (
    assert_parity,
    fresh_model,
    make_batches,
    optimizer,
    reference_run,
    scheduler,
    shard_of,
    train_every_step,
)

ALL_DISK = {"offload_optimizer": "disk", "offload_gradients": "disk", "offload_params": "disk"}


def offload_engine(model: torch.nn.Module, world_size: int, *, tp: int = 1, **plan: object) -> plait.Engine:
    return plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=world_size // tp, tp=tp, bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )


def train_offloaded(rank: int, world_size: int, plan: dict, preset: str = "tiny"):
    model = fresh_model(preset)
    engine = offload_engine(model, world_size, **plan)
    placed = [(t.params, t.optimizer, t.grads) for t in engine.offload.tiers]
    losses, state = train_every_step(engine, model.config.vocab_size)
    assert engine.offload.optimizer is engine.optimizer  # its state is counted per tier and moved with masters
    stats = engine.offload.stats()
    final = [(t.params, t.optimizer, t.grads) for t in engine.offload.tiers]
    engine.close()
    return losses, state, stats, (placed, final)


CASES = {
    "zero1-cpu": {"zero": 1, "offload_optimizer": "cpu", "offload_gradients": "cpu"},
    "zero2-cpu": {"zero": 2, "offload_optimizer": "cpu", "offload_gradients": "cpu"},
    "zero3-cpu-params": {"zero": 3, "offload_optimizer": "cpu", "offload_gradients": "cpu", "offload_params": "cpu"},
    "zero1-disk": {"zero": 1, "offload_optimizer": "disk", "offload_gradients": "disk"},
    "zero2-disk": {"zero": 2, "offload_optimizer": "disk", "offload_gradients": "disk"},
    "zero3-disk": {"zero": 3, "offload_optimizer": "disk", "offload_gradients": "disk"},
    "zero3-params-disk": {"zero": 3, **ALL_DISK},
    "zero2-disk-accumulate4": {"zero": 2, "microbatches": 4, "offload_optimizer": "disk", "offload_gradients": "disk"},
    "zero3-params-disk-accumulate4": {"zero": 3, "microbatches": 4, **ALL_DISK},
    "zero1-optimizer-disk-grads-host": {"zero": 1, "offload_optimizer": "disk"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_offload_matches_one_process(case: str, tmp_path: Path) -> None:
    results = run_ranks(train_offloaded, 2, {**CASES[case], "offload_dir": str(tmp_path)})
    assert_parity([(losses, state) for losses, state, _, _ in results], reference_run("tiny"))
    stats = results[0][2]
    if CASES[case].get("offload_optimizer") == "cpu":  # master, gradients and Adam's two moments on the host
        num_params = sum(p.numel() for p in fresh_model("tiny").parameters())
        assert stats["resident_bytes"]["host"] >= 4 * 4 * num_params // 2, stats
    on_disk = "disk" in str(CASES[case].values())
    assert (stats["read_bytes"] > 0 and stats["write_bytes"] > 0) == on_disk, stats
    assert not any(tmp_path.iterdir()), "the offload files were not removed"


def test_offload_under_dp2_tp2_matches_one_process(tmp_path: Path) -> None:
    plan = {"zero": 3, "tp": 2, **ALL_DISK, "offload_dir": str(tmp_path)}
    results = run_ranks(train_offloaded, 4, plan, "tiny-llama")
    assert_parity([(losses, state) for losses, state, _, _ in results], reference_run("tiny-llama"))


def _budgets(world_size: int) -> dict[str, int]:
    """Budgets that keep everything in memory, only parameter shards, or nothing (tiny, zero=3, fp32)."""
    model = fresh_model("tiny")
    from plait.zero.factory import unit_numels

    sizes = unit_sizes(unit_numels(model), num_shards=world_size)
    plan = plait.Plan(zero=3, memory_budget="1GiB", offload_dir="x")
    floor = working_set_bytes(sizes, plan=plan, param_bytes=4, tiers=UnitTiers("auto", "auto", "auto"))
    shards = sum(size.shard for size in sizes) * 4
    # shards: params 1, gradients 1, master 1, Adam moments 2
    return {"all-in-memory": floor + 5 * shards + 1, "hottest-in-memory": floor + shards + 1, "all-on-disk": floor}


@pytest.mark.parametrize("budget", ["all-in-memory", "hottest-in-memory", "all-on-disk"])
def test_auto_placement_by_budget_matches_one_process(budget: str, tmp_path: Path) -> None:
    plan = {"zero": 3, "memory_budget": str(_budgets(2)[budget]), "offload_dir": str(tmp_path)}
    results = run_ranks(train_offloaded, 2, plan)
    assert_parity([(losses, state) for losses, state, _, _ in results], reference_run("tiny"))
    placed, final = results[0][3]
    expected = {
        "all-in-memory": {("device", "host", "host")},
        # one micro-batch: a gradient shard is written and read back once a step, a parameter shard read
        # twice (forward and backward gathers); on a tie the gradients stay (writes cost more)
        "hottest-in-memory": {("disk", "disk", "host")},
        "all-on-disk": {("disk", "disk", "disk")},
    }[budget]
    assert set(placed) == expected
    # after the measured second step: a master shard that is also the parameter shard moves 4 times
    # a step (2 gathers, read and written by the update), so masters take the memory where they fit
    assert (final != placed) == (budget == "hottest-in-memory"), final


def train_bf16(rank: int, world_size: int, offload_dir: str | None):
    model = fresh_model("tiny")
    plan = {"zero": 3, "precision": "bf16", **(dict(ALL_DISK, offload_dir=offload_dir) if offload_dir else {})}
    engine = offload_engine(model, world_size, **plan)
    return [engine.train_step(shard_of(batch, engine)).loss.item() for batch in make_batches(model.config.vocab_size)]


def test_bf16_offload_to_disk_equals_bf16_in_memory(tmp_path: Path) -> None:
    """bf16 rounds the same way whichever tier holds the fp32 masters: the losses agree to fp32 noise,
    and both track the fp32 reference within the bf16 tolerance (tests/distributed/test_zero_features.py)."""
    offloaded = run_ranks(train_bf16, 2, str(tmp_path))[0]
    in_memory = run_ranks(train_bf16, 2, None)[0]
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(in_memory), rtol=1e-5, atol=0)
    ref_losses, _ = reference_run("tiny")
    torch.testing.assert_close(torch.tensor(offloaded), torch.tensor(ref_losses), rtol=2e-2, atol=0)


def train_fp16(rank: int, world_size: int, offload_dir: str | None):
    model = fresh_model("tiny")
    tiers = (
        {"offload_optimizer": "disk", "offload_gradients": "disk", "offload_dir": offload_dir} if offload_dir else {}
    )
    engine = offload_engine(model, world_size, zero=2, precision="fp16", **tiers)
    batches = make_batches(model.config.vocab_size)[:6]
    results = [engine.train_step(shard_of(batch, engine)) for batch in batches]
    return [r.loss.item() for r in results], [r.skipped for r in results], engine.scaler.scale


def test_fp16_offload_skips_and_scales_as_in_memory(tmp_path: Path) -> None:
    """The paged step finds overflows (the first steps overflow at 2**16) and unscales as the in-memory one."""
    offloaded = run_ranks(train_fp16, 2, str(tmp_path))[0]
    in_memory = run_ranks(train_fp16, 2, None)[0]
    torch.testing.assert_close(torch.tensor(offloaded[0]), torch.tensor(in_memory[0]), rtol=1e-5, atol=0)
    assert offloaded[1:] == in_memory[1:]


def live_state_bytes(engine: plait.Engine) -> int:
    """Model-state bytes in memory now, from the live tensors: every unit's full and shard buffers,
    gradients (the autograd ones before reduction, reductions in flight, shards), optimizer state;
    each storage once."""
    dp = engine.data_parallel
    tensors = [t for unit in dp.units for t in (unit.full, unit.param_shard, unit.master_shard, unit.grad_shard)]
    tensors += [unit.grad_full for unit in dp.units if unit.grad_full is not None]
    tensors += [p.grad for p in engine.model.parameters() if p.grad is not None]
    tensors += [t for _, pending in dp._pending for t in (pending.source, pending.result)]
    tensors += [v for state in engine.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(nbytes for ptr, nbytes in storages.items() if nbytes)


def train_under_budget(rank: int, world_size: int, offload_dir: str, budget: int, tiers: dict):
    model = fresh_model("tiny")
    engine = offload_engine(model, world_size, zero=3, memory_budget=str(budget), offload_dir=offload_dir, **tiers)
    peak = {"bytes": live_state_bytes(engine), "where": "after set-up", "checks": 0}

    def record(where: str) -> None:
        held = live_state_bytes(engine)
        peak["checks"] += 1
        if held > peak["bytes"]:
            peak.update(bytes=held, where=where)

    engine.offload.observers.append(record)
    losses, state = train_every_step(engine, model.config.vocab_size)
    engine.close()
    return losses, state, peak


@pytest.mark.parametrize(
    ("budget", "tiers"),
    [("all-on-disk", ALL_DISK), ("hottest-in-memory", {})],  # the least plait accepts; auto, re-placed
)
def test_a_memory_budget_bounds_the_state_held_at_every_unit_boundary(budget: str, tiers: dict, tmp_path) -> None:
    budget = _budgets(2)[budget]
    results = run_ranks(train_under_budget, 2, str(tmp_path), budget, tiers)
    assert_parity([(losses, state) for losses, state, _ in results], reference_run("tiny"))
    for _, _, peak in results:
        assert peak["checks"] > 20 * 10, peak  # forward, backward and step boundaries, every step
        assert peak["bytes"] <= budget, f"{peak} above the budget of {budget} bytes"


def train_unclipped(rank: int, world_size: int, plan: dict):
    model = fresh_model("tiny")
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=world_size, bucket_mb=0.01, **plan),
        lr_scheduler=scheduler,
    )
    losses, state = train_every_step(engine, model.config.vocab_size)
    updates = engine.offload.stats()["backward_updates"]
    tiers = [(t.params, t.optimizer, t.grads) for t in engine.offload.tiers]
    engine.close()
    return losses, state, updates, len(engine.data_parallel.units), tiers


def unclipped_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    from plait.train.reference import train_reference

    model = fresh_model("tiny")
    batches = make_batches(model.config.vocab_size)
    losses = train_reference(
        model, batches, optimizer=optimizer, loss_fn=plait.losses.causal_lm, lr_scheduler=scheduler
    )
    return losses, model.state_dict()


@pytest.mark.parametrize(("zero", "microbatches"), [(1, 1), (2, 4), (3, 1), (3, 2)])
def test_updates_during_backward_match_one_process(zero: int, microbatches: int, tmp_path: Path) -> None:
    """Without clipping or fp16 each unit's update runs once its gradients are reduced, inside backward."""
    plan = {"zero": zero, "microbatches": microbatches, "offload_dir": str(tmp_path)}
    plan |= ALL_DISK if zero == 3 else {"offload_optimizer": "disk", "offload_gradients": "disk"}
    results = run_ranks(train_unclipped, 2, plan)
    assert_parity([(losses, state) for losses, state, *_ in results], unclipped_reference())
    assert all(updates == num_units for _, _, updates, num_units, _ in results)


def train_pipeline_offloaded(rank: int, world_size: int, offload_dir: str):
    model = fresh_model("tiny")
    plan = {"pp": 2, "zero": 1, "microbatches": 2, "offload_optimizer": "disk", "offload_gradients": "disk"}
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        plan=plait.Plan(dp=1, bucket_mb=0.01, offload_dir=offload_dir, **plan),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    losses, state = train_every_step(engine, model.config.vocab_size)
    engine.close()
    return losses, state


def test_offload_under_a_pipeline_with_zero1_matches_one_process(tmp_path: Path) -> None:
    assert_parity(run_ranks(train_pipeline_offloaded, 2, str(tmp_path)), reference_run("tiny"))


def test_states_moved_after_the_warm_up_keep_parity_when_updated_in_backward(tmp_path: Path) -> None:
    budget = _budgets(2)["hottest-in-memory"]
    results = run_ranks(train_unclipped, 2, {"zero": 3, "memory_budget": str(budget), "offload_dir": str(tmp_path)})
    assert_parity([(losses, state) for losses, state, *_ in results], unclipped_reference())
    for *_, tiers in results:
        assert ("host", "host", "disk") in tiers, tiers  # some units' masters (and parameters) came in
