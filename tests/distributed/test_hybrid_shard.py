"""Hybrid sharding (plan.zero_shard): ZeRO shards inside each node and replicates across nodes.

Four ranks emulate 2 nodes x 2 (the mesh told ranks_per_node=2): the shard groups are {0, 1} and
{2, 3}, the replica groups {0, 2} and {1, 3}. Each ZeRO stage must match one plain process, and no
all-gather or reduce-scatter may cross nodes: between them only the shards' gradient all-reduce
(and the step's scalars) travel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import plait
from plait.checkpoint.io import load_checkpoint
from plait.distributed.mesh import Mesh
from plait.distributed.topology import INTER_NODE
from plait.planner import Cluster, Estimator, ModelShape, Workload
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
from tests.distributed.test_planner_memory import CONFIG, GLOBAL_BATCH, SEQ, measure

RANKS_PER_NODE = 2


def hybrid_engine(plan: plait.Plan, *, ranks_per_node: int = RANKS_PER_NODE) -> tuple[plait.Engine, int]:
    """The tiny model under `plan` on a mesh told its nodes run `ranks_per_node` ranks; and its vocabulary."""
    model = fresh_model("tiny")
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        mesh=Mesh(plan, ranks_per_node=ranks_per_node),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return engine, model.config.vocab_size


def train_hybrid(rank: int, world_size: int, zero: int, microbatches: int, zero_shard: int | str):
    plan = plait.Plan(dp=world_size, zero=zero, zero_shard=zero_shard, microbatches=microbatches, bucket_mb=0.01)
    engine, vocab_size = hybrid_engine(plan)
    groups = (engine.mesh.ranks("zshard"), engine.mesh.ranks("zrep"))
    losses, state = train_every_step(engine, vocab_size)
    inter_ops = {op for (op, _axis, link), sent in engine.comm.sent.items() if link == INTER_NODE and sent}
    return (losses, state), groups, inter_ops


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_hybrid_sharding_matches_one_process(zero: int) -> None:
    results = run_ranks(train_hybrid, 4, zero, 2, "node", timeout_s=120)
    assert_parity([r[0] for r in results], reference_run("tiny"))
    for rank, (_, (shard_group, replica_group), inter_ops) in enumerate(results):
        assert shard_group == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert replica_group == [rank % 2, rank % 2 + 2]
        assert inter_ops == {"all_reduce"}, inter_ops


def _train_by_size(rank: int, world_size: int):
    plan = plait.Plan(dp=world_size, zero=2, zero_shard=2, reduce_op="reduce_scatter", bucket_mb=0.01)
    return train_every_step(*hybrid_engine(plan))


def test_hybrid_sharding_by_size_with_reduce_scatter() -> None:
    """zero_shard as a number, and reduce-scatter in place of gloo's all-reduce inside the shard group."""
    assert_parity(run_ranks(_train_by_size, 4, timeout_s=120), reference_run("tiny"))


def _save_then_continue(rank: int, world: int, plan_kwargs: dict, ranks_per_node: int, path: str, load: str):
    engine, vocab_size = hybrid_engine(plait.Plan(**plan_kwargs), ranks_per_node=ranks_per_node)
    steps = range(10)
    if load:
        engine.load(Path(load))
        steps = range(10, 20)
    batches = make_batches(vocab_size)
    losses = [engine.train_step(shard_of(batches[s], engine)).loss.item() for s in steps]
    engine.save(Path(path))
    return losses


HYBRID = ({"dp": 4, "zero": 3, "zero_shard": "node", "bucket_mb": 0.01}, RANKS_PER_NODE)
PLAIN = ({"dp": 4, "zero": 3, "bucket_mb": 0.01}, 4)


@pytest.mark.parametrize(
    ("first", "second"), [(HYBRID, PLAIN), (PLAIN, HYBRID)], ids=["hybrid->zero3", "zero3->hybrid"]
)
def test_a_checkpoint_reshards_between_hybrid_and_plain_zero3(tmp_path: Path, first, second) -> None:
    """Saved after 10 steps under one layout, resumed for 10 under the other: the losses match the
    reference's steps 11-20, and the final checkpoint holds the reference's weights."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    head = run_ranks(_save_then_continue, 4, *first, a, "", timeout_s=120)[0]
    tail = run_ranks(_save_then_continue, 4, *second, b, a, timeout_s=120)[0]
    ref_losses, ref_state = reference_run("tiny")
    torch.testing.assert_close(torch.tensor(head + tail), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    weights, _, _ = load_checkpoint(Path(b))
    for name, value in ref_state.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _measure_on_two_nodes(rank: int, world_size: int, plan: plait.Plan) -> tuple[int, int]:
    os.environ["LOCAL_WORLD_SIZE"] = str(RANKS_PER_NODE)  # this forked rank's launcher: 2 nodes x 2
    return measure(rank, world_size, plan)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_the_planners_model_states_match_the_runtime_under_hybrid_sharding(zero: int) -> None:
    """The runtime's model-state bytes equal the planner's for dp=4 as 2 nodes x 2 sharded by node (up
    to Adam's 4-byte step counters), and are those of ZeRO over 2 ranks, not 4."""
    plan = plait.Plan(dp=4, zero=zero, zero_shard="node")
    cluster = Cluster.preset("h100", nodes=2, devices_per_node=RANKS_PER_NODE)
    estimator = Estimator(ModelShape(CONFIG), Workload(GLOBAL_BATCH, SEQ), cluster=cluster)
    results = run_ranks(_measure_on_two_nodes, 4, plan, timeout_s=120)
    states = max(r[0] for r in results)
    estimated = estimator.estimate(plan).memory.model_states
    assert abs(estimated - states) <= 4 * 64, (estimated, states)
    over_all_four = estimator.estimate(plait.Plan(dp=4, zero=zero)).memory.model_states
    assert states - over_all_four > 4 * 64, (states, over_all_four)


def _train_on_nodes(rank: int, world_size: int, plan_kwargs: dict, ranks_per_node: int):
    from tests.distributed.test_pipeline_parity import build

    os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)  # this forked rank's launcher: world / ranks_per_node nodes
    model = build()
    plan = plait.Plan(bucket_mb=0.01, **plan_kwargs)
    engine = plait.boost(
        model, optimizer=optimizer, loss_fn=plait.losses.causal_lm, plan=plan, lr_scheduler=scheduler, max_grad_norm=1.0
    )
    assert engine.mesh.size("zshard") == 2 and engine.mesh.size("zrep") == 2
    return train_every_step(engine, model.config.vocab_size)


@pytest.mark.parametrize(
    ("plan", "ranks_per_node"),
    [
        # 2 micro-batches still accumulate; each one more costs 8 ranks on 2 cores ~5 s of ZeRO-3 gathers
        ({"dp": 4, "tp": 2, "zero": 3, "sequence_parallel": True, "microbatches": 2}, 4),
        ({"dp": 4, "pp": 2, "zero": 2, "pp_schedule": "1f1b", "microbatches": 4}, 2),
    ],
    ids=["dp4xtp2-zero3-2nodes", "dp4xpp2-zero2-4nodes"],
)
def test_hybrid_sharding_with_tp_or_pp_on_8_ranks_matches_one_process(plan: dict, ranks_per_node: int) -> None:
    """Shard groups of 2 dp ranks inside each node: beside tp peers (tp x dp = 4 ranks a node), or in
    each pipeline stage (2 ranks a node)."""
    from tests.distributed.test_pipeline_parity import reference

    plan = {**plan, "zero_shard": "node"}
    assert_parity(run_ranks(_train_on_nodes, 8, plan, ranks_per_node, timeout_s=180), reference())


def _train_lazy(rank: int, world_size: int):
    with torch.device("meta"):
        model = fresh_model("tiny")
    engine = plait.boost(
        model,
        optimizer=optimizer,
        loss_fn=plait.losses.causal_lm,
        mesh=Mesh(plait.Plan(dp=world_size, zero=3, zero_shard="node"), ranks_per_node=RANKS_PER_NODE),
        lr_scheduler=scheduler,
        max_grad_norm=1.0,
    )
    return train_every_step(engine, model.config.vocab_size)


def test_lazy_init_under_hybrid_zero3_matches_one_process() -> None:
    """A meta-device model materialised shard by shard over the node's ranks trains as the plain build."""
    assert_parity(run_ranks(_train_lazy, 4, timeout_s=120), reference_run("tiny"))
