"""Between whole tensors and this rank's tensor-parallel shards, read from placement records.

Column shards split each segment of a fused tensor evenly; vocab shards pad
the rows up to a multiple of tp (the padding is dropped when gathering).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.distributed.placement import Placement, placement_of, shard_along, tp_dim


def tp_placements(model: nn.Module) -> dict[str, Placement]:
    """Placements of the model's tp-sharded parameters, by state-dict name (tied aliases included)."""
    out = {}
    for name, param in model.state_dict(keep_vars=True).items():
        placement = placement_of(param)
        if tp_dim(placement) is not None:
            out[name] = placement
    return out


def gather_tp_tensor(local: torch.Tensor, placement: Placement, *, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole tensor from every tp rank's shard (call on every tp rank)."""
    dim = tp_dim(placement)
    size = dist.get_world_size(group)
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    if placement.segments:
        local_sizes = [segment // size for segment in placement.segments]
        by_rank = [shard.split(local_sizes, dim=dim) for shard in shards]
        whole = torch.cat(
            [torch.cat([pieces[i] for pieces in by_rank], dim=dim) for i in range(len(local_sizes))], dim=dim
        )
    else:
        whole = torch.cat(shards, dim=dim)
    return whole.narrow(dim, 0, placement.global_shape[dim])


def shard_tp_tensor(whole: torch.Tensor, placement: Placement, *, rank: int, size: int) -> torch.Tensor:
    """This tp rank's shard of a whole tensor (the inverse of gather_tp_tensor)."""
    return shard_along(whole, placement, rank=rank, size=size).clone()


def gather_tp_state(
    state: dict[str, torch.Tensor], model: nn.Module, *, group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """A state dict of local tp shards made whole (tied aliases follow their source)."""
    if group is None:
        return state
    placements = tp_placements(model)
    return {
        name: gather_tp_tensor(t, placements[name], group=group) if name in placements else t
        for name, t in state.items()
    }
