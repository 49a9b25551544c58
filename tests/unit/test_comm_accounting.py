"""Communication accounting without a process group: the byte formulas, links, axes, metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from plait.distributed.comm import CommCounter, sent_bytes, volume_bytes
from plait.distributed.topology import Topology
from plait.train.logs import format_metrics_line
from plait.train.metrics import COMM_COLUMNS, comm_metrics

# A (pp=2, dp=2, cp=1, tp=2) grid, tp fastest: rank = 4 * pp + 2 * dp + tp.
GRID = [[[[0, 1]], [[2, 3]]], [[[4, 5]], [[6, 7]]]]
AXES = ("pp", "dp", "cp", "tp")


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_formulas(n: int) -> None:
    b = 3 * 1024
    assert sent_bytes("all_reduce", b, n) == 2 * (n - 1) * b / n
    for op in ("all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        assert sent_bytes(op, b, n) == (n - 1) * b / n
    assert sent_bytes("send", b, n) == b  # a message carries its tensor, whatever the group


def test_volume_is_the_zero_papers_count() -> None:
    assert volume_bytes("all_reduce", 100) == 200
    assert [volume_bytes(op, 100) for op in ("all_gather", "reduce_scatter", "send")] == [100, 100, 100]


def test_unknown_collective_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="no byte formula for collective 'gather'"):
        sent_bytes("gather", 10, 2)


def test_axis_of_a_group_is_the_axis_its_ranks_differ_on() -> None:
    topo = Topology.from_grid(GRID, axes=AXES, ranks_per_node=4)
    assert topo.axis_of([0, 1]) == "tp"
    assert topo.axis_of([4, 6]) == "dp"
    assert topo.axis_of([1, 5]) == "pp"
    assert topo.axis_of([0, 4]) == "pp"  # a tied-embedding pair (first and last stage) is a pp group
    assert topo.axis_of(range(8)) == "world"  # clipping's norm under pp x dp x tp
    assert topo.axis_of([0, 99]) == "world"  # off the grid


def test_link_is_intra_node_only_when_every_rank_shares_a_node() -> None:
    topo = Topology.from_grid(GRID, axes=AXES, ranks_per_node=4)  # node 0: ranks 0-3, node 1: ranks 4-7
    assert [topo.link_of(g) for g in ([0, 1], [0, 2], [4, 5, 6, 7])] == ["intra"] * 3
    assert [topo.link_of(g) for g in ([0, 4], [3, 4], range(8))] == ["inter"] * 3
    one_node = Topology.from_grid(GRID, axes=AXES, ranks_per_node=8)
    assert one_node.link_of(range(8)) == "intra"
    by_gpu = Topology.from_grid(GRID, axes=AXES, ranks_per_node=1)
    assert by_gpu.link_of([0, 1]) == "inter"


def test_ranks_per_node_must_divide_the_world() -> None:
    with pytest.raises(ValueError, match="ranks_per_node=3 does not divide the world of 8 ranks"):
        Topology.from_grid(GRID, axes=AXES, ranks_per_node=3)


def counter_on(rank: int, ranks_per_node: int = 4) -> CommCounter:
    return CommCounter(Topology.from_grid(GRID, axes=AXES, ranks_per_node=ranks_per_node), rank=rank)


def test_messages_are_counted_per_axis_and_link() -> None:
    counter = counter_on(rank=1)
    activation = torch.zeros(2, 16, 64)  # 8192 bytes
    counter.record("send", activation, peer=5)  # next pipeline stage, on the other node
    counter.record("send", torch.zeros(10, dtype=torch.int64), peer=5)  # a shape header
    counter.record("send", 1000, peer=3, axis="cp")  # a strand names its axis (a ring over dp x cp ranks)
    assert counter.sent_by_axis == {"pp": 8192 + 80, "cp": 1000}
    assert counter.sent_by_link == {"inter": 8192 + 80, "intra": 1000}
    assert counter.sent_bytes == 8192 + 80 + 1000
    assert counter.bytes_by_kind == {"send": 8192 + 80 + 1000}
    counter.reset()
    assert counter.sent_bytes == 0 and counter.total_bytes == 0


def test_unknown_axis_label_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown axis label 'experts'"):
        counter_on(rank=0).record("send", 8, peer=1, axis="experts")


def test_a_copied_module_keeps_reporting_to_the_same_counter() -> None:
    counter = counter_on(rank=0)
    holder = torch.nn.Linear(2, 2)
    holder.counter = counter
    assert copy.deepcopy(holder).counter is counter


def test_comm_metrics_have_one_value_per_column() -> None:
    counter = counter_on(rank=1)
    counter.record("send", torch.zeros(256), peer=5)
    values = comm_metrics(counter)
    assert tuple(values) == COMM_COLUMNS
    assert values["comm_bytes"] == values["comm_pp_bytes"] == values["comm_inter_bytes"] == 1024
    assert values["comm_dp_bytes"] == values["comm_world_bytes"] == values["comm_intra_bytes"] == 0
    line = format_metrics_line(3, 10, values)
    assert line == "step 3/10 | comm 1.0 kB/step (pp 1.0 kB, inter 1.0 kB)"


def test_offload_copies_report_under_host() -> None:
    counter = counter_on(rank=0)
    counter.record("copy", torch.zeros(100))  # no group, no peer: this rank's device <-> host
    assert counter.sent_by_axis == {"host": 400} and counter.sent_by_link == {"host": 400}
    assert comm_metrics(counter)["comm_host_bytes"] == 400


def test_a_collective_needs_its_group() -> None:
    with pytest.raises(ValueError, match="with its group="):
        counter_on(rank=0).record("all_reduce", torch.zeros(4))
