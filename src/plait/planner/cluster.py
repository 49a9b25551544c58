"""The machines a plan runs on: nodes, devices per node, memory, compute and links.

A `Cluster` is all the planner knows about the target; presets describe common
GPUs from their data sheets, and `plait.planner.calibrate` measures this machine.

Example:
    >>> cluster = Cluster.preset("a100-80gb", nodes=4)
    >>> cluster.num_devices
    32
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from types import MappingProxyType

from plait.sizes import parse_bytes  # noqa: F401  (plait.planner re-exports it from here)

GIB = 2**30


@dataclass(frozen=True)
class Link:
    """One level of interconnect: bandwidth per device (bytes/s, one direction) and latency per message (s).

    `all_gather` and `reduce_scatter` scale the ring model's time for those
    collectives where a backend runs them slower than its all-reduce (gloo's
    reduce-scatter); 1.0 on NCCL. A calibrated link also carries `table`,
    measured all-reduce seconds by buffer bytes over `table_ranks` ranks,
    which replaces the bandwidth/latency model where it has data, and
    `gather_table` / `scatter_table` / `all_to_all_table`, the same for
    all-gather, reduce-scatter and all-to-all (their cost relative to an
    all-reduce changes with the size on gloo: sequence parallel's are small,
    ZeRO's large); a kind with its own table takes no factor.
    """

    bandwidth: float
    latency: float
    all_gather: float = 1.0
    reduce_scatter: float = 1.0
    table: tuple[tuple[int, float], ...] = ()
    table_ranks: int = 2
    gather_table: tuple[tuple[int, float], ...] = ()
    scatter_table: tuple[tuple[int, float], ...] = ()
    all_to_all_table: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or self.latency < 0 or not self.all_gather > 0 or not self.reduce_scatter > 0:
            raise ValueError(
                f"Link(bandwidth={self.bandwidth}, latency={self.latency}): bandwidth must be positive "
                "(bytes/s per device), latency >= 0 (seconds) and the collective factors positive"
            )

    def scale(self, kind: str) -> float:
        return {"all_gather": self.all_gather, "reduce_scatter": self.reduce_scatter}.get(kind, 1.0)

    def replace(self, **changes: object) -> Link:
        return dataclasses.replace(self, **changes)

    def kind_table(self, kind: str) -> tuple[tuple[int, float], ...]:
        """The measured table for a collective kind: its own where calibrated, else the all-reduce's."""
        own = {"all_gather": self.gather_table, "reduce_scatter": self.scatter_table,
               "all_to_all": self.all_to_all_table}.get(kind, ())  # fmt: skip
        return own or self.table

    def all_reduce_table_seconds(self, num_bytes: float, *, kind: str = "all_reduce") -> float:
        """Measured seconds of `kind` (its own table, else the all-reduce's) for a buffer of `num_bytes`
        over `table_ranks`, interpolated linearly between the sizes timed and extrapolated at the largest
        one's rate per byte."""
        table = self.kind_table(kind)
        sizes = [size for size, _ in table]
        times = [seconds for _, seconds in table]
        if num_bytes <= sizes[0]:
            return times[0]
        for (lo, t_lo), (hi, t_hi) in itertools.pairwise(table):
            if num_bytes <= hi:
                return t_lo + (t_hi - t_lo) * (num_bytes - lo) / (hi - lo)
        return times[-1] * num_bytes / sizes[-1]


@dataclass(frozen=True)
class Disk:
    """A node's local disk for offloaded state: free bytes and sequential read / write bytes/s (the whole
    disk; the node's ranks share it)."""

    capacity: int
    read_bandwidth: float
    write_bandwidth: float

    def __post_init__(self) -> None:
        if self.capacity < 1 or not self.read_bandwidth > 0 or not self.write_bandwidth > 0:
            raise ValueError(
                f"Disk(capacity={self.capacity}, read={self.read_bandwidth}, write={self.write_bandwidth}): give a "
                "positive size and bandwidths, e.g. --disk 2TB,6GB/s,4GB/s"
            )


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices.

    - ``peak_flops``: one device's dense peak in the training dtype (FLOP/s);
      ``gemm_efficiency`` the fraction of it large matmuls sustain.
    - ``memory_bandwidth``: device memory bytes/s, which bounds the
      element-wise work (norms, activations, softmax, the optimizer update).
    - ``op_overhead``: seconds of fixed cost per operator launched (kernel
      launch on GPU, dispatch on CPU).
    - ``attention_flops``: the rate (FLOP/s, counted as the time model counts
      attention: 4 x seq x d_model per token forward) of the fused attention
      kernel, which runs at its own rate, not the matmuls'; 0: at the matmul
      rate (``peak_flops * gemm_efficiency``).
    - ``intra`` / ``inter``: the link inside a node and between nodes.
    - ``reserved_bytes``: memory per device that holds no tensors of the
      model (CUDA context, allocator slack), kept out of every plan's budget.
    - ``overlap``: the fraction of data-parallel gradient traffic that hides
      behind backward compute.
    - ``backend``: "nccl" or "gloo"; plait reduces ZeRO gradients with an
      all-reduce on gloo (faster there) and a reduce-scatter on nccl.
    - ``core_share``: the fraction of a core each rank gets while all ranks
      compute (CPU ranks that outnumber the cores: cores / ranks; else 1).
      Calibrated rates are the shared ones; a rank idle in a pipeline bubble
      yields its core to the others.
    - ``host_memory``: host (CPU) memory per node for offloaded state (0:
      none); on a CPU cluster (``backend="gloo"``) the device *is* the host,
      so offloaded-to-host bytes count against the same memory.
    - ``host_link``: host<->device bytes/s per device, one direction (PCIe;
      memcpy on a CPU cluster).
    - ``host_memory_bandwidth``: the node's host memory bytes/s.
    - ``host_adam_rate``: parameters per second one rank's AdamW step runs
      on the host while every rank steps at once.
    - ``disk``: the node's local disk for offloaded state (None: no disk tier).
    """

    name: str
    nodes: int
    devices_per_node: int
    device_memory: int
    peak_flops: float
    memory_bandwidth: float
    intra: Link
    inter: Link
    gemm_efficiency: float = 0.7
    op_overhead: float = 5e-6
    reserved_bytes: int = 2 * GIB
    overlap: float = 1.0
    backend: str = "nccl"
    core_share: float = 1.0
    host_memory: int = 0
    host_link: float = 25e9
    host_memory_bandwidth: float = 200e9
    host_adam_rate: float = 800e6
    disk: Disk | None = None
    attention_flops: float = 0.0

    def __post_init__(self) -> None:
        for field in ("nodes", "devices_per_node", "device_memory"):
            if getattr(self, field) < 1:
                raise ValueError(f"cluster.{field}={getattr(self, field)}: use a positive count")
        if not self.peak_flops > 0 or not self.memory_bandwidth > 0:
            raise ValueError("cluster peak_flops and memory_bandwidth must be positive (FLOP/s, bytes/s)")
        if not 0 < self.gemm_efficiency <= 1 or not 0 <= self.overlap <= 1:
            raise ValueError(
                f"gemm_efficiency={self.gemm_efficiency} lies in (0, 1] and overlap={self.overlap} in [0, 1]"
            )
        if not 0 < self.core_share <= 1:
            raise ValueError(f"cluster.core_share={self.core_share}: a fraction of a core in (0, 1]")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"cluster.backend={self.backend!r}: use 'nccl' (GPUs) or 'gloo' (CPUs)")
        if self.host_memory < 0 or not self.host_link > 0 or not self.host_memory_bandwidth > 0:
            raise ValueError(
                f"cluster host_memory={self.host_memory} must be >= 0 bytes (e.g. --host-mem 2TB) and host_link, "
                "host_memory_bandwidth positive bytes/s"
            )
        if self.attention_flops < 0:
            raise ValueError(f"cluster.attention_flops={self.attention_flops}: FLOP/s >= 0 (0: the matmul rate)")
        if not self.host_adam_rate > 0:
            raise ValueError(f"cluster.host_adam_rate={self.host_adam_rate}: parameters per second, positive")
        if self.reserved_bytes >= self.device_memory:
            raise ValueError(
                f"reserved_bytes={self.reserved_bytes} leaves no room in device_memory={self.device_memory}; lower it"
            )

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def usable_memory(self) -> int:
        """Bytes per device a plan's tensors may use."""
        return self.device_memory - self.reserved_bytes

    @property
    def host_is_device(self) -> bool:
        """CPU ranks: host memory is device memory and host<->device copies are memcpy."""
        return self.backend == "gloo"

    def link(self, group_size: int, *, stride: int = 1) -> Link:
        """The slowest link a group of `group_size` ranks, `stride` apart in rank order, crosses."""
        return self.intra if group_size * stride <= self.devices_per_node else self.inter

    def collective_link(self, group_size: int, *, stride: int = 1) -> Link:
        """The link a ring collective (all-reduce, reduce-scatter, all-gather) of `group_size` ranks,
        `stride` apart, runs at. Across nodes each of the group's k ranks on a node drives its own
        inter-node link (NCCL spreads a ring's channels over the node's NICs, one per GPU), and the
        node's other groups drive the rest: a rank's share of the traffic moves at k times one device's
        inter-node bandwidth, up to the intra-node link every byte also crosses."""
        link = self.link(group_size, stride=stride)
        per_node = min(group_size, self.devices_per_node // stride)
        if link is self.intra or link.table or per_node <= 1:
            return link
        return link.replace(bandwidth=min(self.intra.bandwidth, link.bandwidth * per_node))

    def replace(self, **changes: object) -> Cluster:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, *, nodes: int = 1, devices_per_node: int | None = None) -> Cluster:
        """A data-sheet description of a GPU node (see `PRESETS`)."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown GPU preset {name!r}; choose one of {', '.join(PRESETS)} or --calibrate")
        base = PRESETS[key]
        return base.replace(nodes=nodes, devices_per_node=devices_per_node or base.devices_per_node)


def _gpu(name: str, *, memory: int, flops: float, hbm: float, nvlink: float, host: Host) -> Cluster:
    # 8 GPUs per node; inter-node 8 x 200 Gb/s InfiniBand per node, i.e. 25 GB/s per GPU.
    return Cluster(
        name=name,
        nodes=1,
        devices_per_node=8,
        device_memory=memory,
        peak_flops=flops,
        memory_bandwidth=hbm,
        intra=Link(bandwidth=nvlink, latency=10e-6),
        inter=Link(bandwidth=25e9, latency=20e-6),
        host_memory=host.memory,
        host_link=host.pcie,
        host_memory_bandwidth=host.bandwidth,
        host_adam_rate=min(host.cores / 8 * ADAM_PER_CORE, host.bandwidth / 8 / HOST_ADAM_BYTES),
        disk=NVME,
    )


@dataclass(frozen=True)
class Host:
    """A GPU node's host side: memory bytes, PCIe bytes/s per GPU (one direction, achieved), memory
    bytes/s and CPU cores."""

    memory: int
    pcie: float
    bandwidth: float
    cores: int


# Host AdamW: torch's fused CPU AdamW steps ~800M params/s per core (measured on a Xeon), and reads or
# writes 12 fp32 arrays per parameter (moments, master, gradient, temporaries), so a node's memory
# bandwidth caps it at bandwidth / 48 bytes per parameter, shared by the 8 GPUs' ranks.
ADAM_PER_CORE = 800e6
HOST_ADAM_BYTES = 48
# DGX H100/H200 (NVIDIA DGX H100 user guide): 2 TB DDR5, 2 x Xeon 8480C (112 cores, 8 channels of
# DDR5-4800 each: ~614 GB/s), PCIe gen5 x16 per GPU (64 GB/s per direction on paper, ~50 achieved).
DGX_H100_HOST = Host(memory=2 * 10**12, pcie=50e9, bandwidth=614e9, cores=112)
# DGX A100 640GB (NVIDIA DGX A100 user guide): 2 TB DDR4, 2 x EPYC 7742 (128 cores, 8 channels of
# DDR4-3200 each: ~410 GB/s), PCIe gen4 x16 per GPU (32 GB/s on paper, ~25 achieved).
DGX_A100_HOST = Host(memory=2 * 10**12, pcie=25e9, bandwidth=410e9, cores=128)
# One data-center NVMe drive (e.g. Samsung PM1733 3.84 TB, the DGX cache drives: 7.0 GB/s sequential
# read, 3.8 GB/s write on its data sheet; gen5 drives write ~5 GB/s): 3.84 TB, 6.5 GB/s read, 4 GB/s write.
NVME = Disk(capacity=3_840 * 10**9, read_bandwidth=6.5e9, write_bandwidth=4e9)

# Dense bf16 tensor-core peaks, HBM bandwidth and NVLink bandwidth per direction from NVIDIA's data sheets (SXM).
PRESETS = MappingProxyType(
    {
        "h100": _gpu("h100", memory=80 * GIB, flops=989e12, hbm=3.35e12, nvlink=450e9, host=DGX_H100_HOST),
        "h200": _gpu("h200", memory=141 * 10**9, flops=989e12, hbm=4.8e12, nvlink=450e9, host=DGX_H100_HOST),
        "a100-80gb": _gpu("a100-80gb", memory=80 * GIB, flops=312e12, hbm=2.039e12, nvlink=300e9, host=DGX_A100_HOST),
        "a100-40gb": _gpu("a100-40gb", memory=40 * GIB, flops=312e12, hbm=1.555e12, nvlink=300e9, host=DGX_A100_HOST),
    }
)
