"""When no plan fits: the smallest change that makes one fit, tried in order of how little it asks."""

from __future__ import annotations

from dataclasses import dataclass

from plait.planner.cluster import Cluster
from plait.planner.estimate import describe
from plait.planner.search import SearchResult, SearchSpace, search
from plait.planner.shape import ModelShape
from plait.planner.workload import Workload

GIB = 2**30
MAX_NODES = 4096


class NoPlanFits(ValueError):
    """No valid plan fits in device memory; the message says what would make one fit."""


@dataclass(frozen=True)
class Change:
    description: str
    space: SearchSpace | None = None
    cluster: Cluster | None = None


def _space_changes(space: SearchSpace) -> list[Change]:
    changes = []
    if space.microbatches:
        changes.append(
            Change("smaller micro-batches (let the planner choose plan.microbatches)", space.relax(microbatches=()))
        )
    if "full" not in space.recompute:
        changes.append(Change("plan.recompute='full'", space.relax(recompute=(*space.recompute, "full"))))
    if 3 not in space.zero:
        changes.append(Change("plan.zero=3", space.relax(zero=(*space.zero, 3))))
    if space.precision == "fp32":
        changes.append(Change("plan.precision='bf16'", space.relax(precision="bf16")))
    if space.tp or space.pp:
        changes.append(Change("free choice of tp and pp", space.relax(tp=(), pp=())))
    return changes


def _fits_with(
    change: Change, shape: ModelShape, *, workload: Workload, cluster: Cluster, space: SearchSpace
) -> SearchResult:
    return search(shape, workload, cluster=change.cluster or cluster, space=change.space or space)


def _nodes_needed(shape: ModelShape, *, workload: Workload, cluster: Cluster, space: SearchSpace) -> int | None:
    nodes = cluster.nodes * 2
    while nodes <= MAX_NODES:
        if search(shape, workload, cluster=cluster.replace(nodes=nodes), space=space).best is not None:
            return nodes
        nodes *= 2
    return None


def _offload_tiers(cluster: Cluster, space: SearchSpace) -> tuple[str, ...]:
    """The tiers this cluster offers: host memory on GPUs, and a disk where there is one and a directory."""
    host = ("cpu",) if cluster.host_memory and not cluster.host_is_device else ()
    return host + (("disk",) if cluster.disk is not None and space.offload_dir else ())


def _offload_advice(result: SearchResult, shape: ModelShape, *, workload: Workload, space: SearchSpace) -> list[str]:
    """With offload not searched: the fastest offloading plan that fits, if any. With offload searched:
    what the smallest offloading plan still lacks (device, host or disk bytes)."""
    cluster = result.cluster
    if not space.offload:
        tiers = _offload_tiers(cluster, space)
        found = search(shape, workload, cluster=cluster, space=space.relax(offload=tiers)).best if tiers else None
        if found is None:
            return []
        m = found.memory
        return [
            f"offloading fits: {describe(found.plan)}: {found.step_s:.3g} s/step, device {m.total / GIB:.2f} GiB, "
            f"host {m.host / GIB:.2f} GiB, disk {m.disk / GIB:.2f} GiB per rank (plait plan --offload auto)"
        ]
    offloaded = [e for e in result.estimates if e.offload is not None]
    if not offloaded:
        return []
    smallest = min(offloaded, key=lambda e: e.memory.total)
    m, ranks = smallest.memory, cluster.devices_per_node
    disk = cluster.disk.capacity if cluster.disk is not None else 0
    return [
        f"offloading does not fit either: the smallest, {describe(smallest.plan)}, needs {m.total / GIB:.2f} GiB per "
        f"device, {m.host * ranks / GIB:.1f} GiB of host memory per node (have {cluster.host_memory / GIB:.0f}; "
        f"--host-mem) and {m.disk * ranks / 1e9:.0f} GB of disk per node (have {disk / 1e9:.0f}; --disk)"
    ]


def explain_no_fit(result: SearchResult, shape: ModelShape, *, workload: Workload, space: SearchSpace) -> str:
    """The smallest plan's memory, then each change that would fit, least disruptive first."""
    cluster = result.cluster
    if not result.estimates:
        return (
            f"no valid plan for {cluster.num_devices} devices: the degrees must divide the device count, "
            f"the global batch ({workload.global_batch}) must split over dp, and tp must divide the heads"
        )
    smallest = min(result.estimates, key=lambda e: e.memory.total)
    m = smallest.memory
    lines = [
        f"no plan fits in {cluster.device_memory / GIB:.1f} GiB per device ({cluster.reserved_bytes / GIB:.1f} GiB "
        f"reserved): the smallest, {describe(smallest.plan)}, needs {m.total / GIB:.2f} GiB "
        f"(model states {m.model_states / GIB:.2f}, activations {m.activations / GIB:.2f}, "
        f"working {(m.working + m.comm) / GIB:.2f})"
    ]
    for change in _space_changes(space):
        found = _fits_with(change, shape, workload=workload, cluster=cluster, space=space).best
        if found is not None:
            lines.append(f"smallest change that fits: {change.description} -> {describe(found.plan)}")
            return "\n".join(lines)
    lines += _offload_advice(result, shape, workload=workload, space=space)
    nodes = _nodes_needed(shape, workload=workload, cluster=cluster, space=space)
    if nodes is not None:
        lines.append(f"smallest change that fits: --nodes {nodes} ({nodes * cluster.devices_per_node} devices)")
    else:
        lines.append(f"even {MAX_NODES} nodes do not fit it: shorten seq_len or use a smaller model")
    return "\n".join(lines)
