"""Communication accounting for every collective plait issues, and the all-reduce helper.

Each call a strand makes is recorded once, before it is issued, with
`counter.record(op, tensor, group=...)` (or `peer=` for a point-to-point
message). B is the bytes of the call's full buffer (an all-reduce's tensor,
an all-gather's output, a reduce-scatter's input, an all-to-all's input, a
message's payload) and N the ranks in its group. Per call this rank

    op               sends (ring, what the wire carries)   volume (ZeRO paper)
    all_reduce       2 (N-1)/N x B                          2B
    all_gather       (N-1)/N x B                            B
    reduce_scatter   (N-1)/N x B                            B
    all_to_all       (N-1)/N x B   (keeps its own 1/N)      B
                     uneven splits: the rows for the others (`sent=`)
    broadcast        (N-1)/N x B   (pipelined; average)     B
    send             B                                      B
    copy             B   (device <-> host or disk: offload)  B

A receive sends nothing; a group of one rank moves nothing. Where N does not
divide B the figure is the average over the group's ranks. `sent` holds the
first figure per mesh axis and per link (`intra`- or `inter`-node; a copy
takes no group and counts under `host`, as axis and link); `bytes_by_kind` and
`total_bytes` keep the ZeRO paper's volume, whose theory per step with one
micro-batch is 2P for DDP and ZeRO-1 and 3P for ZeRO-3.

The axis is the mesh axis along which the group's ranks differ (`world` when
they differ on several, e.g. clipping's norm under tp x pp); strands whose
groups are not mesh axes (expert parallel) name it: `axis="ep"`. Counting reads
only shapes and dtypes: no host sync, no device work.

    counter = CommCounter.for_mesh(mesh)
    counter.record("all_to_all", tokens, group=ep_group, axis="ep")   # one call per collective
    counter.record("send", kv_block, peer=next_rank)                 # context-parallel ring
    counter.record("copy", optimizer_state_shard)                     # offload to host memory
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from plait.distributed.topology import HOST, INTER_NODE, INTRA_NODE, SPANNING, Topology

if TYPE_CHECKING:
    from plait.distributed.mesh import Mesh

# The ring factor k of each collective: this rank sends k (N-1)/N x B.
RING_FACTORS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "broadcast": 1}
POINT_TO_POINT = ("send", "copy")
AXIS_LABELS = ("dp", "tp", "pp", "cp", "ep", SPANNING, HOST)  # what the metrics report, one column each
LINKS = (INTRA_NODE, INTER_NODE, HOST)


def sent_bytes(op: str, nbytes: int, group_size: int) -> float:
    """Bytes this rank sends for one `op` on a B = `nbytes` buffer over `group_size` ranks (table above)."""
    if op in POINT_TO_POINT:
        return float(nbytes)
    if op not in RING_FACTORS:
        known = ", ".join([*RING_FACTORS, *POINT_TO_POINT])
        raise ValueError(f"no byte formula for collective {op!r}; record one of {known} (or add its formula here)")
    return RING_FACTORS[op] * (group_size - 1) * nbytes / group_size


def volume_bytes(op: str, nbytes: int) -> int:
    """The ZeRO paper's count: an all-reduce moves 2B (reduce-scatter + all-gather), the rest B."""
    return 2 * nbytes if op == "all_reduce" else nbytes


@dataclass(frozen=True)
class Route:
    axis: str
    link: str
    size: int  # ranks taking part


HOST_ROUTE = Route(axis=HOST, link=HOST, size=1)


@dataclass(frozen=True)
class Entered:
    """The last collective this rank entered (recorded just before it is issued): what a hang report
    shows. `index` counts every collective the counter has seen, so ranks compare how far they got."""

    op: str
    axis: str
    group_size: int
    nbytes: int
    index: int

    def describe(self) -> str:
        return f"{self.op} over {self.axis} ({self.group_size} ranks, {self.nbytes:,} bytes)"


class CommCounter:
    """Bytes this rank sends, per (op, mesh axis, link), since the last `reset`; see the module docstring.

    One counter per engine (`engine.comm`), handed to every strand that communicates.
    """

    def __init__(self, topology: Topology | None = None, *, rank: int | None = None) -> None:
        self.topology = topology or Topology.one_node()
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.sent: Counter[tuple[str, str, str]] = Counter()  # (op, axis, link) -> bytes sent
        self.bytes_by_kind: Counter[str] = Counter()  # op -> the ZeRO paper's volume
        self._routes: dict[Any, Route] = {}  # by process group or ("peer", rank): computed once each
        self.entered: Entered | None = None  # read by the hang watchdog's thread; never reset

    @classmethod
    def for_mesh(cls, mesh: Mesh) -> CommCounter:
        """A counter that names axes and links from `mesh`'s rank grid and its ranks per node."""
        if mesh.device_mesh is None:
            return cls()
        topology = Topology.from_grid(
            mesh.device_mesh.mesh, axes=mesh.device_mesh.mesh_dim_names, ranks_per_node=mesh.ranks_per_node
        )
        return cls(topology, rank=mesh.global_rank)

    def __deepcopy__(self, memo: dict[int, Any]) -> CommCounter:
        return self  # a copied module (a pipeline stage's untied head) still reports to the engine's counter

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_routes": {}}  # process groups do not pickle; routes are found again

    def record(
        self,
        op: str,
        tensor: torch.Tensor | int,
        *,
        group: dist.ProcessGroup | None = None,
        peer: int | None = None,
        axis: str | None = None,
        sent: int | None = None,
    ) -> None:
        """Count one `op` on `tensor` (or that many bytes) over `group`, or to global rank `peer`
        (a `copy` takes neither). `sent`: the bytes this rank sends to the others when the split is
        uneven (an all-to-all with split sizes), in place of the even-split formula."""
        nbytes = tensor if isinstance(tensor, int) else tensor.numel() * tensor.element_size()
        route = HOST_ROUTE if op == "copy" else self._route(group, peer)
        if route.size < 2 and route is not HOST_ROUTE:
            return
        if axis is not None and axis not in AXIS_LABELS:
            raise ValueError(f"unknown axis label {axis!r}; use one of {AXIS_LABELS} (or add it to AXIS_LABELS)")
        self.sent[(op, axis or route.axis, route.link)] += (
            sent if sent is not None else sent_bytes(op, nbytes, route.size)
        )
        if route is not HOST_ROUTE:
            index = self.entered.index + 1 if self.entered is not None else 1
            self.entered = Entered(op, axis or route.axis, route.size, nbytes, index)
        self.bytes_by_kind[op] += volume_bytes(op, nbytes)

    def _route(self, group: dist.ProcessGroup | None, peer: int | None) -> Route:
        key = ("peer", peer) if peer is not None else group
        route = self._routes.get(key)
        if route is None:
            if peer is not None:
                ranks = [self.rank, peer]
            elif group is not None:
                ranks = dist.get_process_group_ranks(group)
            else:
                raise ValueError("record a collective with its group= (or a message with peer=)")
            route = Route(axis=self.topology.axis_of(ranks), link=self.topology.link_of(ranks), size=len(ranks))
            self._routes[key] = route
        return route

    def _sum_by(self, position: int) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for key, value in self.sent.items():
            totals[key[position]] += value
        return dict(totals)

    @property
    def sent_by_axis(self) -> dict[str, float]:
        """Bytes sent per axis label (dp, tp, pp, cp, ep, world, host)."""
        return self._sum_by(1)

    @property
    def sent_by_link(self) -> dict[str, float]:
        """Bytes sent inside one node (`intra`), between nodes (`inter`) and copied to host (`host`)."""
        return self._sum_by(2)

    @property
    def sent_bytes(self) -> float:
        """Bytes this rank sent over every axis and link."""
        return sum(self.sent.values())

    @property
    def total_bytes(self) -> int:
        """The ZeRO paper's volume over every kind (all-reduce 2B, the rest B)."""
        return sum(self.bytes_by_kind.values())

    def reset(self) -> None:
        self.sent.clear()
        self.bytes_by_kind.clear()


# torch 2.13 renamed the flat collectives (the old names warn); the GPU image's torch 2.11 has only those.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(
    tensor: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    counter: CommCounter | None = None,
    async_op: bool = False,
) -> dist.Work | None:
    """Sum-all-reduce in place over `group`; a no-op when the group is None (one rank)."""
    if group is None:
        return None
    if counter is not None:
        counter.record("all_reduce", tensor, group=group)
    return dist.all_reduce(tensor, group=group, async_op=async_op)
