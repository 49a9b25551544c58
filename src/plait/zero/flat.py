"""A flat unit: parameters laid end to end in one buffer, split evenly over dp ranks.

The buffer is padded to a multiple of the shard count; rank r owns the range
[r*S, (r+1)*S). Each parameter that overlaps a rank's range contributes one
1-D *piece* there: the optimizer steps on pieces, and each piece carries a
placement record (name, global shape, flat range) for clipping and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from plait.distributed.placement import Placement, set_placement


@dataclass(frozen=True)
class Span:
    """Where one parameter sits in its unit's flat buffer."""

    name: str
    start: int
    numel: int
    shape: torch.Size


@dataclass(frozen=True)
class Piece:
    """The part of a parameter inside this rank's shard: flat offsets [lo, hi) of the unit."""

    span: Span
    lo: int
    hi: int


class FlatLayout:
    """Offsets of parameters in a padded flat buffer, and this rank's share of it."""

    def __init__(self, named_shapes: list[tuple[str, torch.Size]], *, num_shards: int, shard_index: int) -> None:
        self.spans: list[Span] = []
        offset = 0
        for name, shape in named_shapes:
            numel = int(torch.Size(shape).numel())
            self.spans.append(Span(name=name, start=offset, numel=numel, shape=torch.Size(shape)))
            offset += numel
        self.numel = offset
        self.shard_size = -(-offset // num_shards)  # ceil
        self.padded_numel = self.shard_size * num_shards
        self.shard_start = shard_index * self.shard_size
        self.shard_end = self.shard_start + self.shard_size

    def pieces(self) -> list[Piece]:
        """Every parameter's overlap with this rank's shard (empty overlaps skipped)."""
        out = []
        for span in self.spans:
            lo = max(span.start, self.shard_start)
            hi = min(span.start + span.numel, self.shard_end)
            if lo < hi:
                out.append(Piece(span=span, lo=lo, hi=hi))
        return out


def make_piece_param(
    piece: Piece,
    *,
    master_shard: torch.Tensor,
    grad_shard: torch.Tensor,
    layout: FlatLayout,
    sharded: bool,
    base: Placement | None,
    axis: str = "dp",
) -> nn.Parameter:
    """An optimizer parameter viewing the master shard, its grad viewing the reduced grad shard.

    Its placement is the parameter's own (`base`: tensor-parallel dims, partial
    gradients) plus, when the shard is a true dp shard, the flat range it covers over `axis`
    (`edp` for expert-parallel parameters, sharded over their replicas only).
    """
    lo, hi = piece.lo - layout.shard_start, piece.hi - layout.shard_start
    param = nn.Parameter(master_shard[lo:hi], requires_grad=True)
    param.grad = grad_shard[lo:hi]
    span = piece.span
    flat_range = (axis, piece.lo - span.start, piece.hi - span.start) if sharded else None
    placement = base or Placement(name=span.name, global_shape=tuple(span.shape))
    set_placement(param, replace(placement, name=span.name, flat_range=flat_range))
    return param


def views_of(flat: torch.Tensor, layout: FlatLayout) -> list[torch.Tensor]:
    """Each parameter's shaped view into a full flat buffer."""
    return [flat[s.start : s.start + s.numel].view(s.shape) for s in layout.spans]
