"""The substrate: process groups, placements, launch and collectives, on torch.distributed only."""

from plait.distributed.comm import CommCounter, all_reduce
from plait.distributed.launch import get_logger, init_distributed, is_main_rank
from plait.distributed.mesh import Mesh
from plait.distributed.placement import Placement, placement_of, set_placement
from plait.distributed.topology import Topology

__all__ = [
    "CommCounter",
    "Mesh",
    "Placement",
    "Topology",
    "all_reduce",
    "get_logger",
    "init_distributed",
    "is_main_rank",
    "placement_of",
    "set_placement",
]
