"""Where each rank sits: its coordinate on every mesh axis and its node.

Communication accounting reads this to name the mesh axis a group of ranks
spans and the link its bytes cross (inside one node or between nodes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

SPANNING = "world"  # the axis label of a group whose ranks differ on several mesh axes
INTRA_NODE = "intra"
INTER_NODE = "inter"
HOST = "host"  # a rank's own device <-> host or disk copies (offload): an axis label and a link


def launched_ranks_per_node(world_size: int) -> int:
    """Ranks on each node as torchrun launched them (LOCAL_WORLD_SIZE); the whole world
    when the variable is absent (one process, or ranks forked on one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


@dataclass(frozen=True)
class Topology:
    """Each global rank's coordinate on `axes` and its node (`rank // ranks_per_node`, as
    torchrun numbers ranks node by node).

    >>> topo = Topology.from_grid([[0, 1], [2, 3]], axes=("dp", "tp"), ranks_per_node=2)
    >>> topo.axis_of([0, 1]), topo.link_of([0, 1]), topo.axis_of([1, 3]), topo.link_of([1, 3])
    ('tp', 'intra', 'dp', 'inter')
    """

    axes: tuple[str, ...]
    coords: dict[int, tuple[int, ...]]  # global rank -> its index along each of `axes`
    ranks_per_node: int

    @classmethod
    def from_grid(cls, grid: Sequence, *, axes: Sequence[str], ranks_per_node: int) -> Topology:
        """From a nested list (or tensor) of global ranks with one dim per axis, as DeviceMesh holds them."""
        coords: dict[int, tuple[int, ...]] = {}
        _walk(grid.tolist() if hasattr(grid, "tolist") else grid, (), coords)
        world_size = len(coords)
        if ranks_per_node < 1 or world_size % ranks_per_node:
            raise ValueError(
                f"ranks_per_node={ranks_per_node} does not divide the world of {world_size} ranks; pass the "
                "number of ranks each node runs (torchrun's --nproc-per-node)"
            )
        if any(len(c) != len(axes) for c in coords.values()):
            raise ValueError(f"the rank grid has another number of dims than the axes {tuple(axes)}")
        return cls(axes=tuple(axes), coords=coords, ranks_per_node=ranks_per_node)

    @classmethod
    def one_node(cls) -> Topology:
        """No mesh: every group is labelled `world` and stays inside one node."""
        return cls(axes=(), coords={}, ranks_per_node=1 << 30)

    def axis_of(self, ranks: Sequence[int]) -> str:
        """The one mesh axis along which `ranks` differ, or `world` when they differ on several
        (or the ranks are not on the grid)."""
        if any(rank not in self.coords for rank in ranks):
            return SPANNING
        points = [self.coords[rank] for rank in ranks]
        varying = [axis for i, axis in enumerate(self.axes) if len({p[i] for p in points}) > 1]
        return varying[0] if len(varying) == 1 else SPANNING

    def link_of(self, ranks: Sequence[int]) -> str:
        """`intra` when every rank is on one node, else `inter` (a ring that crosses nodes is
        bounded by its slowest hop, so the whole collective counts as inter-node)."""
        nodes = {rank // self.ranks_per_node for rank in ranks}
        return INTRA_NODE if len(nodes) <= 1 else INTER_NODE


def _walk(grid: list | int, prefix: tuple[int, ...], coords: dict[int, tuple[int, ...]]) -> None:
    if not isinstance(grid, list):
        coords[int(grid)] = prefix
        return
    for index, sub in enumerate(grid):
        _walk(sub, (*prefix, index), coords)
