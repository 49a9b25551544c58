"""Measure this machine as a `Cluster`: matmul peak, memory bandwidth, per-operator cost, and
collective bandwidth, latency and overlap on a local process group.

Every rank measures at the same time, so ranks that share cores or memory
bandwidth see what a real run would see. With a process group already
initialised it is used; otherwise `calibrate(num_ranks)` forks that many
gloo ranks on this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from plait.planner.cluster import Cluster, Link
from plait.train.metrics import measure_peak_flops

SMALL, LARGE = 1 << 18, 1 << 23  # all-reduce sizes in bytes: latency-bound and bandwidth-bound


@dataclass(frozen=True)
class Measured:
    peak_flops: float
    gemm_flops: float
    memory_bandwidth: float
    op_overhead: float
    small_s: float
    large_s: float
    all_gather_s: float
    reduce_scatter_s: float
    overlap: float


def _median_s(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gemm_flops(tokens: int, hidden: int) -> float:
    """A layer's worth of transformer-shaped matmuls (q/k/v/o and a 4x MLP), forward and backward."""
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights = [torch.randn(hidden, hidden, requires_grad=True) for _ in range(4)]
    weights += [
        torch.randn(hidden, 4 * hidden, requires_grad=True),
        torch.randn(4 * hidden, hidden, requires_grad=True),
    ]

    def step() -> None:
        out = sum((x @ w).sum() for w in weights[:4]) + (x @ weights[4] @ weights[5]).sum()
        out.backward()

    flops = 3 * 2 * tokens * (4 * hidden * hidden + 8 * hidden * hidden)
    return flops / _median_s(step)


def _elementwise_rate(tokens: int, hidden: int) -> float:
    """Activation bytes per second that a layer's element-wise work moves, as the time model charges it.

    Times a LayerNorm, a tanh-GELU on a 4x wider tensor and a residual add,
    forward and backward; the time model charges element-wise work as 2x the
    saved activation bytes forward and twice that backward, so the rate is
    6 * saved bytes / seconds (saved: the norm's input, the GELU's input and
    output, in fp32).
    """
    x = torch.randn(tokens, hidden, requires_grad=True)
    wide = torch.randn(tokens, 4 * hidden, requires_grad=True)
    norm = torch.nn.LayerNorm(hidden)

    def step() -> None:
        out = norm(x).sum() + torch.nn.functional.gelu(wide, approximate="tanh").sum() + (x + x).sum()
        out.backward()

    saved = 4 * (tokens * hidden + 2 * tokens * 4 * hidden)
    return 6 * saved / _median_s(step)


def _op_overhead(num_ops: int = 200) -> float:
    """Seconds per operator on tiny tensors, forward and backward through autograd (3 launches per op)."""
    x = torch.ones(8, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(num_ops):
            y = y * 1.0001
        y.sum().backward()

    return _median_s(chain) / (3 * num_ops)


def _collective_s(num_bytes: int, group: dist.ProcessGroup | None, kind: str = "all_reduce") -> float:
    """Seconds of one collective over a buffer of `num_bytes` (the full buffer, as the ring model counts it)."""
    ranks = dist.get_world_size(group)
    full = torch.zeros(num_bytes // 4 // ranks * ranks)
    shard = torch.zeros(full.numel() // ranks)
    calls = {
        "all_reduce": lambda: dist.all_reduce(full, group=group),
        "all_gather": lambda: dist.all_gather_single(full, shard, group=group),
        "reduce_scatter": lambda: dist.reduce_scatter_single(shard, full, group=group),
    }

    def run() -> None:
        dist.barrier(group=group)
        calls[kind]()

    barrier = _median_s(lambda: dist.barrier(group=group))
    return max(1e-7, _median_s(run) - barrier)


def _overlap(group: dist.ProcessGroup | None) -> float:
    """Fraction of an all-reduce that hides behind matmuls running meanwhile (0: none, 1: all)."""
    tensor = torch.zeros(LARGE // 4)
    a = torch.randn(512, 512)
    if dist.get_world_size(group) == 1:
        return 1.0
    comm = _collective_s(LARGE, group)
    count = max(1, int(comm / _median_s(lambda: a @ a)))
    compute = _median_s(lambda: [a @ a for _ in range(count)])

    def both() -> None:
        dist.barrier(group=group)
        work = dist.all_reduce(tensor, group=group, async_op=True)
        for _ in range(count):
            a @ a
        work.wait()

    together = _median_s(both)
    return min(1.0, max(0.0, (compute + comm - together) / min(compute, comm)))


def _together(measure, group: dist.ProcessGroup | None):
    """Start a measurement on every rank at once, so ranks sharing cores contend as in a run."""
    if dist.is_initialized():
        dist.barrier(group=group)
    return measure()


def measure_rank(group: dist.ProcessGroup | None = None, *, tokens: int = 512, hidden: int = 256) -> Measured:
    """This rank's measurements; every rank of `group` must call it together.

    `tokens` x `hidden` sets the shape of the transformer-like matmuls timed
    for the sustained rate (CPU matmul speed depends on size: use the planned
    model's micro-batch tokens and width)."""
    return Measured(
        peak_flops=_together(lambda: measure_peak_flops(torch.device("cpu")), group),
        gemm_flops=_together(lambda: _gemm_flops(tokens, hidden), group),
        memory_bandwidth=_together(lambda: _elementwise_rate(tokens, hidden), group),
        op_overhead=_together(_op_overhead, group),
        small_s=_collective_s(SMALL, group),  # one rank: no traffic, measured as ~0
        large_s=_collective_s(LARGE, group),
        all_gather_s=_collective_s(LARGE, group, "all_gather"),
        reduce_scatter_s=_collective_s(LARGE, group, "reduce_scatter"),
        overlap=_overlap(group),
    )


def _link(measured: list[Measured], ranks: int) -> Link:
    """Ring all-reduce: t = 2(N-1)/N * B / bandwidth + 2(N-1) * latency, solved from two sizes; the
    all-gather and reduce-scatter factors are their measured times over that model's prediction."""
    small_s, large_s = max(m.small_s for m in measured), max(m.large_s for m in measured)
    factor = 2 * (ranks - 1) / ranks
    bandwidth = factor * (LARGE - SMALL) / max(large_s - small_s, 1e-9)
    latency = max(0.0, (small_s - factor * SMALL / bandwidth) / (2 * (ranks - 1)))
    ring = (ranks - 1) / ranks * LARGE / bandwidth + (ranks - 1) * latency
    return Link(
        bandwidth=bandwidth,
        latency=latency,
        all_gather=max(m.all_gather_s for m in measured) / ring,
        reduce_scatter=max(m.reduce_scatter_s for m in measured) / ring,
    )


def cluster_from(measurements: list[Measured], *, device_memory: int) -> Cluster:
    """The slowest rank's figures as a one-node cluster of len(measurements) CPU ranks."""
    ranks = len(measurements)
    gemm = min(m.gemm_flops for m in measurements)
    peak = max(gemm, min(m.peak_flops for m in measurements))
    link = _link(measurements, max(ranks, 2)) if ranks > 1 else Link(bandwidth=1e12, latency=0.0)
    return Cluster(
        name=f"calibrated-cpu-x{ranks}",
        nodes=1,
        devices_per_node=ranks,
        device_memory=device_memory,
        peak_flops=peak,
        memory_bandwidth=min(m.memory_bandwidth for m in measurements),
        intra=link,
        inter=link,
        gemm_efficiency=gemm / peak,
        op_overhead=max(m.op_overhead for m in measurements),
        reserved_bytes=0,
        overlap=min(m.overlap for m in measurements) if ranks > 1 else 1.0,
        backend="gloo",
    )


def _worker(rank: int, ranks: int, store_path: str, queue: mp.Queue, shape: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, ranks)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ranks)
    queue.put((rank, measure_rank(tokens=shape[0], hidden=shape[1])))
    dist.destroy_process_group()


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(
    num_ranks: int = 2,
    *,
    device_memory: int | None = None,
    tokens: int = 512,
    hidden: int = 256,
    timeout_s: float = 300.0,
) -> Cluster:
    """Measure `num_ranks` local ranks (forked, one thread each) or, if a process group exists, its ranks.

    `device_memory` defaults to this machine's memory divided among the ranks;
    `tokens` and `hidden` shape the timed matmuls (see `measure_rank`).
    """
    if dist.is_initialized():
        gathered: list[Measured | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measure_rank(tokens=tokens, hidden=hidden))
        memory = device_memory or _host_memory() // dist.get_world_size()
        return cluster_from([m for m in gathered if m is not None], device_memory=memory)
    if num_ranks < 1:
        raise ValueError(f"calibrate(num_ranks={num_ranks}): measure at least one rank")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="plait-calibrate-") as workdir:
        store = str(Path(workdir, "store"))
        shape = (tokens, hidden)
        procs = [ctx.Process(target=_worker, args=(r, num_ranks, store, queue, shape)) for r in range(num_ranks)]
        for proc in procs:
            proc.start()
        results = dict(queue.get(timeout=timeout_s) for _ in procs)
        for proc in procs:
            proc.join(timeout_s)
    return cluster_from(
        [results[r] for r in range(num_ranks)], device_memory=device_memory or _host_memory() // num_ranks
    )
