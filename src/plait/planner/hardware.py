"""`plait plan`'s host and disk options: `--host-mem SIZE` and `--disk SIZE[,READ_BW[,WRITE_BW]]`.

>>> parse_disk("2TB,6GB/s,4GB/s")
Disk(capacity=2000000000000, read_bandwidth=6000000000.0, write_bandwidth=4000000000.0)
"""

from __future__ import annotations

from plait.planner.cluster import NVME, Cluster, Disk
from plait.sizes import parse_bytes

DISK_EXAMPLE = "--disk 2TB,6GB/s,4GB/s (size, then read and write bandwidth)"


def parse_rate(text: str) -> float:
    """'6GB/s' or '6GB' (per second) as bytes per second."""
    return float(parse_bytes(text.strip().removesuffix("/s")))


def parse_disk(text: str, *, default: Disk | None = None) -> Disk:
    """SIZE[,READ_BW[,WRITE_BW]]; bandwidths left out come from `default` (a preset's or a measured
    disk), else a data-center NVMe drive's (`NVME`)."""
    parts = [part.strip() for part in text.split(",")]
    base = default or NVME
    try:
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise ValueError
        capacity = parse_bytes(parts[0])
        read = parse_rate(parts[1]) if len(parts) > 1 else base.read_bandwidth
        write = parse_rate(parts[2]) if len(parts) > 2 else base.write_bandwidth
        return Disk(capacity=capacity, read_bandwidth=read, write_bandwidth=write)
    except ValueError:
        raise ValueError(f"--disk {text!r}: write it as SIZE[,READ_BW[,WRITE_BW]], e.g. {DISK_EXAMPLE}") from None


def parse_host_memory(text: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--host-mem {text!r}: give host memory per node as a size, e.g. --host-mem 512GiB")
    return size


def with_host_and_disk(cluster: Cluster, *, host_mem: str | None, disk: str | None) -> Cluster:
    """`cluster` with `--host-mem` and `--disk` applied. On a CPU cluster the host memory is also the
    devices' memory, so `--host-mem` sets both."""
    changes: dict[str, object] = {}
    if host_mem:
        changes["host_memory"] = parse_host_memory(host_mem)
        if cluster.host_is_device:
            changes["device_memory"] = changes["host_memory"] // cluster.devices_per_node
    if disk:
        changes["disk"] = parse_disk(disk, default=cluster.disk)
    return cluster.replace(**changes) if changes else cluster
