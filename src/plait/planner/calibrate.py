"""Measure this machine as a `Cluster`: matmul peak, memory bandwidth, per-operator cost, and
collective bandwidth, latency and overlap on a local process group; for offload, the host's AdamW
rate (every rank at once), host memcpy bandwidth and the disk (`calibrate_io`).

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

from plait.distributed.comm import all_gather_flat, reduce_scatter_flat
from plait.planner.calibrate_io import DiskMeasurement, adam_rate, measure_disk, measure_memcpy
from plait.planner.cluster import Cluster, Link
from plait.planner.comm import collective_seconds
from plait.planner.timing import OPS_PER_LAYER

LARGE = 1 << 22  # bytes of the all-gather, reduce-scatter and overlap probes
TABLE_BYTES = (1 << 12, 1 << 16, 1 << 19, 1 << 22, 1 << 24)  # all-reduce sizes timed for the link's table


@dataclass(frozen=True)
class Probe:
    """The shape and dtype of the timed matmuls and element-wise work: the planned model's micro-batch
    tokens and width, in its training dtype (CPU matmul speed depends on both)."""

    tokens: int = 512
    hidden: int = 256
    dtype: torch.dtype = torch.float32
    seq_len: int = 128  # the attention probe's sequence (rows of tokens // seq_len sequences)


@dataclass(frozen=True)
class Measured:
    """One rank's raw figures (rates per second, seconds per collective)."""

    peak_flops: float
    gemm_flops: float
    attention_flops: float
    memory_bandwidth: float
    op_overhead: float
    all_reduce_s: tuple[float, ...]  # at TABLE_BYTES
    all_gather_s: tuple[float, ...]  # at TABLE_BYTES
    reduce_scatter_s: tuple[float, ...]  # at TABLE_BYTES
    all_to_all_s: tuple[float, ...]  # at TABLE_BYTES
    overlap: float
    adam_rate: float = 800e6  # parameters per second of AdamW on this rank's host share


@dataclass(frozen=True)
class HostIO:
    """This machine's host side, measured once: memcpy bytes/s and the disk offload would use."""

    memcpy: float
    disk: DiskMeasurement | None = None


def _block_s(fn, repeats: int = 8) -> float:
    """Seconds per call over `repeats` calls timed as one block, after a warm-up call. Ranks that share
    cores all run their blocks at once (see `_together`), so the block sees the shared rate, where a
    median of single calls would pick the calls that ran while the others waited."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _median_s(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gemm_flops(probe: Probe) -> float:
    """A layer's worth of transformer-shaped matmuls (q/k/v/o and a 4x MLP), forward and backward."""
    tokens, hidden, dtype = probe.tokens, probe.hidden, probe.dtype
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    weights = [torch.randn(hidden, hidden, dtype=dtype, requires_grad=True) for _ in range(4)]
    weights += [
        torch.randn(hidden, 4 * hidden, dtype=dtype, requires_grad=True),
        torch.randn(4 * hidden, hidden, dtype=dtype, requires_grad=True),
    ]

    def step() -> None:
        out = sum((x @ w).sum() for w in weights[:4]) + (x @ weights[4] @ weights[5]).sum()
        out.backward()

    flops = 3 * 2 * tokens * (4 * hidden * hidden + 8 * hidden * hidden)
    return flops / _block_s(step)


def _attention_flops(probe: Probe, head_dim: int = 64) -> float:
    """Causal fused attention forward and backward at the probe's shape, as FLOP/s counted the way the
    time model counts attention (4 x seq x hidden per token forward, backward twice that): torch's
    fused kernels run at their own rate, not the matmuls' (slower on a CPU at short sequences)."""
    seq = max(2, min(probe.seq_len, probe.tokens))
    batch, heads = max(1, probe.tokens // seq), max(1, probe.hidden // head_dim)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=probe.dtype, requires_grad=True) for _ in range(3))

    def step() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    flops = 3 * 4 * batch * seq * seq * heads * head_dim
    return flops / _block_s(step)


def _peak_flops(dtype: torch.dtype, size: int = 1024) -> float:
    """A large square fp32 matmul's rate (the MFU denominator's kind of figure), timed as a block."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / _block_s(lambda: a @ b, repeats=8)


def _elementwise_rate(probe: Probe) -> float:
    """Activation bytes per second that a layer's element-wise work moves, as the time model charges it.

    Times a LayerNorm, a tanh-GELU on a 4x wider tensor and a residual add,
    forward and backward; the time model charges element-wise work as 2x the
    saved activation bytes forward and twice that backward, so the rate is
    6 * saved bytes / seconds (saved: the norm's input, the GELU's input and
    output, in fp32).
    """
    tokens, hidden, dtype = probe.tokens, probe.hidden, probe.dtype
    x = torch.randn(tokens, hidden, dtype=dtype, requires_grad=True)
    wide = torch.randn(tokens, 4 * hidden, dtype=dtype, requires_grad=True)
    norm = torch.nn.LayerNorm(hidden, dtype=dtype)

    def step() -> None:
        out = norm(x).sum() + torch.nn.functional.gelu(wide, approximate="tanh").sum() + (x + x).sum()
        out.backward()

    saved = x.element_size() * (tokens * hidden + 2 * tokens * 4 * hidden)
    return 6 * saved / _block_s(step)


def _op_overhead() -> float:
    """Seconds per operator of a transformer layer too small for its arithmetic to count: a tiny
    plait GPT layer's forward and backward over `3 * OPS_PER_LAYER` operators."""
    from plait.models.gpt import Block
    from plait.models.gpt_config import GPTConfig

    block = Block(GPTConfig(vocab_size=256, max_seq_len=8, d_model=32, num_layers=1, num_heads=2))
    x = torch.randn(1, 8, 32, requires_grad=True)
    return _block_s(lambda: block(x).sum().backward(), repeats=32) / (3 * OPS_PER_LAYER)


def _collective_s(num_bytes: int, group: dist.ProcessGroup | None, kind: str = "all_reduce") -> float:
    """Seconds per collective over a buffer of `num_bytes` (the full buffer, as the ring model counts
    it): eight back to back after a barrier, so the barrier's own noise stays out; median of three."""
    ranks = dist.get_world_size(group)
    full = torch.zeros(max(ranks, num_bytes // 4 // ranks * ranks))
    shard, out = torch.zeros(full.numel() // ranks), torch.empty_like(full)
    calls = {
        "all_reduce": lambda: dist.all_reduce(full, group=group),
        "all_gather": lambda: all_gather_flat(full, shard, group=group),
        "reduce_scatter": lambda: reduce_scatter_flat(shard, full, group=group),
        "all_to_all": lambda: dist.all_to_all_single(out, full, group=group),
    }

    def block() -> float:
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(8):
            calls[kind]()
        return (time.perf_counter() - start) / 8

    block()
    return statistics.median(block() for _ in range(3))


def _overlap(group: dist.ProcessGroup | None) -> float:
    """Fraction of an all-reduce that hides behind matmuls running meanwhile (0: none, 1: all)."""
    if dist.get_world_size(group) == 1:
        return 1.0
    tensor = torch.zeros(LARGE // 4)
    a = torch.randn(512, 512)
    comm = _collective_s(LARGE, group)
    count = max(1, int(comm / _median_s(lambda: a @ a)))
    compute = _median_s(lambda: [a @ a for _ in range(count)], repeats=9)

    def both() -> None:
        dist.barrier(group=group)
        work = dist.all_reduce(tensor, group=group, async_op=True)
        for _ in range(count):
            a @ a
        work.wait()

    together = _median_s(both, repeats=9)
    return min(1.0, max(0.0, (compute + comm - together) / min(compute, comm)))


def _together(measure, group: dist.ProcessGroup | None):
    """Start a measurement on every rank at once, so ranks sharing cores contend as in a run."""
    if dist.is_initialized():
        dist.barrier(group=group)
    return measure()


def measure_rank(group: dist.ProcessGroup | None = None, *, probe: Probe | None = None) -> Measured:
    """This rank's measurements; every rank of `group` must call it together."""
    probe = probe or Probe()
    return Measured(
        peak_flops=_together(lambda: _peak_flops(probe.dtype), group),
        gemm_flops=_together(lambda: _gemm_flops(probe), group),
        attention_flops=_together(lambda: _attention_flops(probe), group),
        memory_bandwidth=_together(lambda: _elementwise_rate(probe), group),
        op_overhead=_together(_op_overhead, group),
        all_reduce_s=tuple(_collective_s(size, group) for size in TABLE_BYTES),
        all_gather_s=tuple(_collective_s(size, group, "all_gather") for size in TABLE_BYTES),
        reduce_scatter_s=tuple(_collective_s(size, group, "reduce_scatter") for size in TABLE_BYTES),
        all_to_all_s=tuple(_collective_s(size, group, "all_to_all") for size in TABLE_BYTES),
        overlap=_overlap(group),
        adam_rate=_together(adam_rate, group),
    )


def _median_measured(repeats: list[Measured]) -> Measured:
    """Each figure's median over repeated calibrations (a shared machine is noisy)."""
    fields = {}
    for name in Measured.__dataclass_fields__:
        values = [getattr(m, name) for m in repeats]
        if isinstance(values[0], tuple):
            fields[name] = tuple(statistics.median(v[i] for v in values) for i in range(len(values[0])))
        else:
            fields[name] = statistics.median(values)
    return Measured(**fields)


def _monotone(times: list[float]) -> list[float]:
    """A larger buffer never takes less time: cap each time by the next larger size's (noise spikes)."""
    out = list(times)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _slowest(measured: list[Measured], name: str) -> list[float]:
    """The slowest rank's times by size of one collective kind, made monotone."""
    return _monotone([max(getattr(m, name)[i] for m in measured) for i in range(len(TABLE_BYTES))])


def _link(measured: list[Measured], ranks: int) -> Link:
    """The slowest rank's all-reduce, all-gather, reduce-scatter and all-to-all times by size as the link's tables,
    with the ring model's bandwidth and latency fitted to the all-reduce's (least squares) for display
    and for other group sizes; the all-gather and reduce-scatter factors (shown, and used by links
    without their own tables) are their times at `LARGE` over what the all-reduce table predicts."""
    times = _slowest(measured, "all_reduce_s")
    steps = 2 * (ranks - 1)
    xs, ys = [steps / ranks * size for size in TABLE_BYTES], times
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    bandwidth = 1 / max(slope, 1e-15)
    latency = max(0.0, (mean_y - slope * mean_x) / steps)
    link = Link(
        bandwidth=bandwidth, latency=latency, table=tuple(zip(TABLE_BYTES, times, strict=True)), table_ranks=ranks
    )
    gather, scatter = _slowest(measured, "all_gather_s"), _slowest(measured, "reduce_scatter_s")
    large = TABLE_BYTES.index(LARGE)
    return link.replace(
        all_gather=gather[large] / collective_seconds(LARGE, ranks=ranks, link=link, kind="all_gather"),
        reduce_scatter=scatter[large] / collective_seconds(LARGE, ranks=ranks, link=link, kind="reduce_scatter"),
        gather_table=tuple(zip(TABLE_BYTES, gather, strict=True)),
        scatter_table=tuple(zip(TABLE_BYTES, scatter, strict=True)),
        all_to_all_table=tuple(zip(TABLE_BYTES, _slowest(measured, "all_to_all_s"), strict=True)),
    )


def cluster_from(measurements: list[Measured], *, device_memory: int, io: HostIO | None = None) -> Cluster:
    """The slowest rank's figures as a one-node cluster of len(measurements) CPU ranks. The host is the
    device: its memory is `_host_memory()`, host<->device copies are memcpy (shared by the ranks)."""
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
        attention_flops=min(m.attention_flops for m in measurements),
        op_overhead=max(m.op_overhead for m in measurements),
        reserved_bytes=0,
        overlap=min(m.overlap for m in measurements) if ranks > 1 else 1.0,
        backend="gloo",
        core_share=min(1.0, _num_cores() / ranks),
        host_memory=_host_memory(),
        host_adam_rate=min(m.adam_rate for m in measurements),
        **_host_fields(io, ranks),
    )


def _host_fields(io: HostIO | None, ranks: int) -> dict[str, object]:
    if io is None:
        return {}
    return {"host_link": io.memcpy / ranks, "host_memory_bandwidth": 2 * io.memcpy, "disk": io.disk and io.disk.disk}


def measure_host_io(directory: str | None) -> HostIO:
    """memcpy bandwidth and, where `directory` (default: the temp dir) is writable, its disk."""
    try:
        disk = measure_disk(directory)
    except OSError as err:
        print(f"plait plan: could not time the disk in {directory or tempfile.gettempdir()} ({err}); no disk tier")
        disk = None
    if disk is not None:
        print(f"plait plan: {disk.note}")
    return HostIO(memcpy=measure_memcpy(), disk=disk)


def _worker(rank: int, ranks: int, store_path: str, queue: mp.Queue, options: tuple[Probe, int]) -> None:
    probe, repeats = options
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, ranks)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ranks)
    measured = [measure_rank(probe=probe) for _ in range(repeats)]
    queue.put((rank, _median_measured(measured)))
    dist.destroy_process_group()


def _num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(
    num_ranks: int = 2,
    *,
    device_memory: int | None = None,
    probe: Probe | None = None,
    repeats: int = 1,
    timeout_s: float = 300.0,
    io_dir: str | None = None,
) -> Cluster:
    """Measure `num_ranks` local ranks (forked, one thread each) or, if a process group exists, its ranks.

    `device_memory` defaults to this machine's memory divided among the ranks;
    `probe` shapes the timed matmuls (`Probe`); with `repeats` > 1 each figure
    is the median of that many calibrations; the disk is timed in `io_dir`
    (default: the temp dir) after the ranks finish.
    """
    if dist.is_initialized():
        gathered: list[Measured | None] = [None] * dist.get_world_size()
        mine = _median_measured([measure_rank(probe=probe) for _ in range(repeats)])
        dist.all_gather_object(gathered, mine)
        memory = device_memory or _host_memory() // dist.get_world_size()
        return cluster_from([m for m in gathered if m is not None], device_memory=memory)
    if num_ranks < 1:
        raise ValueError(f"calibrate(num_ranks={num_ranks}): measure at least one rank")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="plait-calibrate-") as workdir:
        store = str(Path(workdir, "store"))
        options = (probe or Probe(), repeats)
        procs = [ctx.Process(target=_worker, args=(r, num_ranks, store, queue, options)) for r in range(num_ranks)]
        for proc in procs:
            proc.start()
        results = dict(queue.get(timeout=timeout_s) for _ in procs)
        for proc in procs:
            proc.join(timeout_s)
    return cluster_from(
        [results[r] for r in range(num_ranks)],
        device_memory=device_memory or _host_memory() // num_ranks,
        io=measure_host_io(io_dir),
    )
