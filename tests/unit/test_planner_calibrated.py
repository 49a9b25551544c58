"""The time model's terms a calibrated (CPU) cluster measures: per-kind collective tables, fused attention's
own rate, and context parallel (cp ranks are dp replicas plus the ring's hops)."""

from __future__ import annotations

import dataclasses

import pytest

from plait.config import Plan
from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, Estimator, Link, ModelShape, Workload
from plait.planner.comm import collective_seconds
from plait.planner.memory import ADAM_BYTES
from plait.planner.timing import TimeModel

CONFIG = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, num_layers=4, num_heads=4)
SIZES = (1 << 12, 1 << 16, 1 << 20)


def cpu_cluster(**changes: object) -> Cluster:
    link = Link(bandwidth=1e9, latency=1e-4, table=tuple(zip(SIZES, (1e-4, 3e-4, 2e-3), strict=True)), table_ranks=2)
    base = Cluster(
        name="cpu", nodes=1, devices_per_node=4, device_memory=8 << 30, peak_flops=1e11, memory_bandwidth=1e10,
        intra=link, inter=link, reserved_bytes=0, backend="gloo", overlap=0.0,
    )  # fmt: skip
    return base.replace(**changes)


def test_a_kind_with_its_own_table_reads_it_not_the_all_reduce_factor() -> None:
    link = cpu_cluster().intra.replace(reduce_scatter=3.0)
    # no table of its own: the all-reduce's time, halved for a ring's half of the steps, times the factor
    assert collective_seconds(1 << 16, ranks=2, link=link, kind="reduce_scatter") == pytest.approx(3e-4 / 2 * 3.0)
    timed = link.replace(scatter_table=tuple(zip(SIZES, (2e-4, 7e-4, 4e-3), strict=True)))
    assert collective_seconds(1 << 16, ranks=2, link=timed, kind="reduce_scatter") == pytest.approx(7e-4)
    # over 4 ranks: 3 ring steps where the table's 2 ranks took 1
    assert collective_seconds(1 << 16, ranks=4, link=timed, kind="reduce_scatter") == pytest.approx(3 * 7e-4)
    assert collective_seconds(1 << 16, ranks=2, link=timed, kind="all_reduce") == pytest.approx(3e-4)


def test_attention_runs_at_its_own_calibrated_rate() -> None:
    shape, workload, plan = ModelShape(CONFIG, name="tiny"), Workload(8, 64), Plan(dp=1).resolve(1)
    plain = TimeModel(shape, workload, cluster=cpu_cluster())
    slow = TimeModel(shape, workload, cluster=cpu_cluster(attention_flops=2e10))
    attention = 8 * 64 * 4.0 * 64 * 64  # one layer's forward attention FLOPs: tokens x 4 s d
    matmul_rate = 1e11 * cpu_cluster().gemm_efficiency
    extra = slow._layer_seconds(plan, 8, moe=False) - plain._layer_seconds(plan, 8, moe=False)
    assert extra == pytest.approx(attention / 2e10 - attention / matmul_rate)


def test_cp_is_dp_over_its_ranks_plus_the_rings_hops() -> None:
    shape, workload, cluster = ModelShape(CONFIG, name="tiny"), Workload(8, 64), cpu_cluster()
    estimator = Estimator(shape, workload, cluster=cluster)
    cp = estimator.estimate(Plan(dp=2, cp=2, zero=1).resolve(4))
    dp = estimator.estimate(Plan(dp=4, zero=1).resolve(4))
    assert cp.memory.model_states == dp.memory.model_states  # ZeRO shards over dp x cp
    block = 2 * (8 // 4 * 64) * 64 * 4  # stack(k, v), fp32, of this rank's tokens
    hop = block / cluster.intra.bandwidth + cluster.intra.latency
    hops = 1 + 1 + 1  # forward: k/v once; backward: k/v once and the dK/dV accumulator's cp - 1 hops
    assert cp.time.cp_comm == pytest.approx(CONFIG.num_layers * hops * hop)
    assert cp.step_s == pytest.approx(dp.step_s + cp.time.cp_comm)
    assert dataclasses.replace(cp.time, cp_comm=0.0).total == pytest.approx(dp.time.total)


def test_cpu_ranks_step_the_optimizer_at_the_calibrated_host_adamw_rate() -> None:
    shape, workload = ModelShape(CONFIG, name="tiny"), Workload(8, 64)
    plan = Plan(dp=1).resolve(1)
    fast, slow = (
        TimeModel(shape, workload, cluster=cpu_cluster(host_adam_rate=rate)).estimate(plan).optimizer
        for rate in (1e9, 1e8)
    )
    elements = Estimator(shape, workload, cluster=cpu_cluster()).estimate(plan).memory.optimizer / ADAM_BYTES
    assert elements == pytest.approx(CONFIG.num_parameters(), rel=1e-3)
    assert slow - fast == pytest.approx(elements / 1e8 - elements / 1e9)
