"""The links the planner's collectives run at: a ring across nodes uses every NIC its ranks on a node drive."""

from __future__ import annotations

from plait.planner import Cluster


def test_a_ring_across_nodes_runs_at_its_ranks_per_node_times_one_nic() -> None:
    cluster = Cluster.preset("h100", nodes=8)  # 8 GPUs per node, 25 GB/s inter-node per GPU, 450 GB/s NVLink
    nic = cluster.inter.bandwidth
    assert cluster.collective_link(8) is cluster.intra  # inside one node
    assert cluster.collective_link(64).bandwidth == 8 * nic  # pure data parallel: 8 ranks per node, 8 NICs
    assert cluster.collective_link(16, stride=4).bandwidth == 2 * nic  # tp=4: 2 of the group's ranks per node
    assert cluster.collective_link(8, stride=8).bandwidth == nic  # tp=8: one rank per node, its own NIC
    assert cluster.collective_link(64, stride=8) == cluster.inter
    fast = cluster.replace(inter=cluster.inter.replace(bandwidth=100e9))
    assert fast.collective_link(64).bandwidth == fast.intra.bandwidth  # never faster than NVLink
    assert cluster.link(64) is cluster.inter  # point-to-point transfers keep one NIC per rank
