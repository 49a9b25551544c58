"""Hybrid sharding (plan.zero_shard) on paper: the shard group's size from the nodes, the planner's
model states (shards of P / shard) and traffic (ZeRO inside the node, the shards' all-reduce between
nodes), and which replica writes a checkpoint piece."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from plait.checkpoint.layout import RankCoords, writes_piece
from plait.config import Plan
from plait.distributed.placement import Placement
from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, ModelShape
from plait.planner.cluster import Link
from plait.planner.comm import collective_seconds, dp_step_seconds
from plait.planner.memory import unit_state_bytes, with_zero_shard

GPT3 = GPTConfig(vocab_size=51200, max_seq_len=2048, d_model=12288, num_layers=96, num_heads=96)


@pytest.mark.parametrize(
    ("plan", "ranks_per_node", "expected"),
    [
        (Plan(dp=16, zero=3, zero_shard="node"), 8, 8),
        (Plan(dp=8, tp=2, zero=3, zero_shard="node"), 8, 4),  # tp peers share the node
        (Plan(dp=4, tp=2, pp=2, zero=1, zero_shard="node"), 16, 4),  # the node holds whole dp groups
        (Plan(dp=4, pp=2, zero=2, zero_shard="node"), 4, 4),  # a node per pipeline stage
        (Plan(dp=8, zero=2, zero_shard=2), 8, 2),
        (Plan(dp=8, zero=2), 2, 8),
    ],
)
def test_the_shard_group_is_a_nodes_dp_ranks(plan: Plan, ranks_per_node: int, expected: int) -> None:
    assert plan.zero_shard_size(ranks_per_node) == expected


def test_node_sharding_refuses_nodes_that_split_a_tp_group() -> None:
    with pytest.raises(ValueError, match="a node must hold whole tp x cp groups"):
        Plan(dp=4, tp=4, zero=1, zero_shard="node").zero_shard_size(2)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hybrid_model_states_are_those_of_zero_over_the_shard_group(stage: int, precision: str) -> None:
    """Each rank holds shards of P / shard: the bytes of plain ZeRO over dp = shard, whatever dp is."""
    shape = ModelShape(GPT3)
    units = shape.stage_units(0, num_layers=GPT3.num_layers, pp=1, tp=1)
    hybrid = unit_state_bytes(units, Plan(dp=64, zero=stage, zero_shard=8, precision=precision))
    assert hybrid == unit_state_bytes(units, Plan(dp=8, zero=stage, precision=precision))
    assert hybrid != unit_state_bytes(units, Plan(dp=64, zero=stage, precision=precision))


def test_node_sharding_resolves_against_the_cluster() -> None:
    plan = with_zero_shard(Plan(dp=16, zero=3, zero_shard="node"), ranks_per_node=8)
    assert plan.zero_shard == 8
    assert with_zero_shard(Plan(dp=16, zero=3), ranks_per_node=8).zero_shard == "all"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hybrid_traffic_is_zero_in_the_node_plus_the_shards_all_reduce_between_nodes(stage: int) -> None:
    """dp=4 as 2 nodes x 2 with a slow inter-node link: the step's dp seconds are the shard group's ZeRO
    collectives on the fast link plus, per reduction, an all-reduce of each unit's P/2 fp32 gradient
    shard over the 2 replicas on the slow one."""
    fast, slow = Link(bandwidth=100e9, latency=1e-6), Link(bandwidth=1e9, latency=1e-4)
    cluster = replace(Cluster.preset("h100", nodes=2, devices_per_node=2), intra=fast, inter=slow)
    shape = ModelShape(GPTConfig(vocab_size=2048, max_seq_len=64, d_model=128, num_layers=4, num_heads=4))
    units = shape.stage_units(0, num_layers=4, pp=1, tp=1)
    microbatches = 2
    hybrid = Plan(dp=4, zero=stage, zero_shard=2, microbatches=microbatches)
    inside = dp_step_seconds(Plan(dp=2, zero=stage, microbatches=microbatches), units, cluster=cluster)
    reductions = 1 if stage == 1 else microbatches
    between = reductions * sum(
        collective_seconds(4.0 * math.ceil(unit.local(1) / 2), ranks=2, link=slow, kind="all_reduce") for unit in units
    )
    assert dp_step_seconds(hybrid, units, cluster=cluster) == pytest.approx(inside + between, rel=1e-12)
    # and it beats ZeRO over all four ranks, whose every collective crosses the slow link
    assert inside + between < dp_step_seconds(Plan(dp=4, zero=stage, microbatches=microbatches), units, cluster=cluster)


def test_only_the_first_shard_group_writes_a_hybrid_piece() -> None:
    placement = Placement(name="w", global_shape=(8,), flat_range=("zshard", 0, 4))

    def coords(dp: int, zshard: int, zrep: int) -> RankCoords:
        return RankCoords({"dp": (dp, 4), "zshard": (zshard, 2), "zrep": (zrep, 2)})

    assert writes_piece(placement, coords=coords(0, 0, 0))
    assert writes_piece(placement, coords=coords(1, 1, 0))
    assert not writes_piece(placement, coords=coords(2, 0, 1))
    assert not writes_piece(placement, coords=coords(3, 1, 1))


def test_the_search_offers_node_sharding_across_nodes_only() -> None:
    """With zero_shard=("all", "node"), every ZeRO plan whose dp group spans nodes comes in both forms, the
    hybrid one moving less data-parallel traffic over the slow link; none at stage 0 or on one node."""
    from plait.planner import Workload
    from plait.planner.search import SearchSpace, search

    shape = ModelShape(GPTConfig(vocab_size=2048, max_seq_len=64, d_model=128, num_layers=4, num_heads=4))
    space = SearchSpace(
        precision="bf16", zero=(0, 1, 3), recompute=("none",), tp=(1,), pp=(1,), zero_shard=("all", "node")
    )
    slow = Link(bandwidth=1e9, latency=1e-4)
    cluster = replace(Cluster.preset("h100", nodes=2, devices_per_node=4), inter=slow, overlap=0.0)
    estimates = search(shape, Workload(16, 64), cluster=cluster, space=space).estimates
    by_plan = {(e.plan.zero, e.plan.microbatches, e.plan.zero_shard): e for e in estimates}
    hybrid = [key for key in by_plan if key[2] != "all"]
    assert hybrid and {key[2] for key in hybrid} == {4} and {key[0] for key in hybrid} == {1, 3}
    for zero, microbatches, _ in hybrid:
        assert by_plan[zero, microbatches, 4].time.dp_comm < by_plan[zero, microbatches, "all"].time.dp_comm
    one_node = replace(cluster, nodes=1, devices_per_node=8)
    assert all(
        e.plan.zero_shard == "all" for e in search(shape, Workload(16, 64), cluster=one_node, space=space).estimates
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ep": 2}, "plan.zero_shard='node' with plan.ep"),
        ({"offload_optimizer": "cpu"}, "plan.zero_shard='node' with offloaded states"),
    ],
)
def test_hybrid_sharding_refuses_what_it_does_not_build_yet(fields: dict, message: str) -> None:
    plan = Plan(dp=4, zero=1, zero_shard="node", **fields)
    with pytest.raises(ValueError, match=message):
        plan.check_available()
