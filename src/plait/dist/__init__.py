"""The substrate: process groups, placements, launch and collectives, on torch.distributed only."""

from plait.dist.comm import CommCounter, all_reduce
from plait.dist.launch import get_logger, init_distributed, is_main_rank
from plait.dist.mesh import Mesh
from plait.dist.placement import Placement, placement_of, set_placement

__all__ = [
    "CommCounter",
    "Mesh",
    "Placement",
    "all_reduce",
    "get_logger",
    "init_distributed",
    "is_main_rank",
    "placement_of",
    "set_placement",
]
