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
from dataclasses import dataclass
from types import MappingProxyType

from plait.sizes import parse_bytes  # noqa: F401  (plait.planner re-exports it from here)

GIB = 2**30


@dataclass(frozen=True)
class Link:
    """One level of interconnect: bandwidth per device (bytes/s, one direction) and latency per message (s).

    `all_gather` and `reduce_scatter` scale the ring model's time for those
    collectives where a backend runs them slower than its all-reduce (gloo's
    reduce-scatter, FACTS.md); 1.0 on NCCL. A calibrated link also carries
    `table`, measured all-reduce seconds by buffer bytes over `table_ranks`
    ranks, which replaces the bandwidth/latency model where it has data.
    """

    bandwidth: float
    latency: float
    all_gather: float = 1.0
    reduce_scatter: float = 1.0
    table: tuple[tuple[int, float], ...] = ()
    table_ranks: int = 2

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

    def all_reduce_table_seconds(self, num_bytes: float) -> float:
        """Measured all-reduce seconds for `num_bytes` over `table_ranks`, interpolated linearly
        between the sizes timed and extrapolated at the largest one's rate per byte."""
        sizes = [size for size, _ in self.table]
        times = [seconds for _, seconds in self.table]
        if num_bytes <= sizes[0]:
            return times[0]
        for (lo, t_lo), (hi, t_hi) in zip(self.table, self.table[1:], strict=False):
            if num_bytes <= hi:
                return t_lo + (t_hi - t_lo) * (num_bytes - lo) / (hi - lo)
        return times[-1] * num_bytes / sizes[-1]


@dataclass(frozen=True)
class Cluster:
    """Nodes of identical devices.

    - ``peak_flops``: one device's dense peak in the training dtype (FLOP/s);
      ``gemm_efficiency`` the fraction of it large matmuls sustain.
    - ``memory_bandwidth``: device memory bytes/s, which bounds the
      element-wise work (norms, activations, softmax, the optimizer update).
    - ``op_overhead``: seconds of fixed cost per operator launched (kernel
      launch on GPU, dispatch on CPU).
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

    def link(self, group_size: int, *, stride: int = 1) -> Link:
        """The slowest link a group of `group_size` ranks, `stride` apart in rank order, crosses."""
        return self.intra if group_size * stride <= self.devices_per_node else self.inter

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


def _gpu(name: str, *, memory: int, flops: float, hbm: float, nvlink: float) -> Cluster:
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
    )


# Dense bf16 tensor-core peaks, HBM bandwidth and NVLink bandwidth per direction from NVIDIA's data sheets (SXM).
PRESETS = MappingProxyType(
    {
        "h100": _gpu("h100", memory=80 * GIB, flops=989e12, hbm=3.35e12, nvlink=450e9),
        "h200": _gpu("h200", memory=141 * 10**9, flops=989e12, hbm=4.8e12, nvlink=450e9),
        "a100-80gb": _gpu("a100-80gb", memory=80 * GIB, flops=312e12, hbm=2.039e12, nvlink=300e9),
        "a100-40gb": _gpu("a100-40gb", memory=40 * GIB, flops=312e12, hbm=1.555e12, nvlink=300e9),
    }
)
