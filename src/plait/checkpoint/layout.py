"""Where a rank's piece of a tensor sits in the whole tensor, independent of any plan.

A piece is described by the placement record's slicing (tensor-parallel dim
and segments, a flat range over the tp-local tensor) plus the rank's position
on the axes that slice it. That description alone says where every local
element sits in the whole tensor (`global_indices` spells it out element by
element, the tests' oracle; assemble.py moves pieces by block copies), so a
checkpoint written under one plan reads into any other with no code that
knows about ZeRO, tensor or pipeline parallel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from plait.config import AXES
from plait.distributed.placement import Placement, shard_along, tp_dim

PADDING = -1  # the index of an element outside the whole tensor (vocabulary padding, flat-unit padding)


@dataclass(frozen=True)
class PieceLayout:
    """How one local tensor maps into its whole tensor (JSON-serialisable)."""

    global_shape: tuple[int, ...]
    tp_dim: int | None = None
    segments: tuple[int, ...] = ()
    tp: tuple[int, int] = (0, 1)  # (rank, size) on the tp axis
    flat: tuple[int, int] | None = None  # [lo, hi) of the flattened tp-local tensor
    rows: tuple[int, int] | None = None  # [lo, hi) of dim 0 taken before the tp slice (experts under ep x tp)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PieceLayout:
        flat = data.get("flat")
        return cls(
            global_shape=tuple(data["global_shape"]),
            tp_dim=data.get("tp_dim"),
            segments=tuple(data.get("segments", ())),
            tp=tuple(data.get("tp", (0, 1))),  # type: ignore[arg-type]
            flat=tuple(flat) if flat is not None else None,  # type: ignore[arg-type]
            rows=tuple(data["rows"]) if data.get("rows") is not None else None,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class RankCoords:
    """A rank's (rank, size) on every mesh axis."""

    coords: dict[str, tuple[int, int]] = field(default_factory=dict)

    def rank(self, axis: str) -> int:
        return self.coords.get(axis, (0, 1))[0]

    def size(self, axis: str) -> int:
        return self.coords.get(axis, (0, 1))[1]


def layout_of(placement: Placement | None, *, shape: tuple[int, ...], coords: RankCoords) -> PieceLayout:
    """The layout of a local tensor of `shape` with this placement (None: the whole tensor)."""
    if placement is None:
        return PieceLayout(global_shape=tuple(shape))
    dim = tp_dim(placement)
    flat = placement.flat_range[1:] if placement.flat_range else None
    rows = None
    if ("ep", 0) in placement.dim_shards:
        if dim is None:
            flat = _expert_range(placement, flat=flat, shape=shape, coords=coords)
        else:  # split over tp too: this ep rank's experts, then their tp slice
            per_rank = placement.global_shape[0] // coords.size("ep")
            rows = (coords.rank("ep") * per_rank, (coords.rank("ep") + 1) * per_rank)
    return PieceLayout(
        global_shape=tuple(placement.global_shape),
        tp_dim=dim,
        segments=tuple(placement.segments),
        tp=(coords.rank("tp"), coords.size("tp")) if dim is not None else (0, 1),
        flat=flat,
        rows=rows,
    )


def _expert_range(
    placement: Placement, *, flat: tuple[int, int] | None, shape: tuple[int, ...], coords: RankCoords
) -> tuple[int, int]:
    """An ep rank's experts are rows of dim 0, one contiguous range of the whole tensor: its pieces
    (whole, or a ZeRO flat range of them) are flat ranges of the whole, readable under any ep."""
    local_numel = math.prod(placement.global_shape) // coords.size("ep")
    offset = coords.rank("ep") * local_numel
    lo, hi = flat if flat is not None else (0, math.prod(shape))
    return offset + lo, offset + hi


def global_indices(layout: PieceLayout) -> torch.Tensor:
    """The whole-tensor flat index of each local element, in local order (PADDING outside it)."""
    numel = math.prod(layout.global_shape)
    whole = torch.arange(numel, dtype=torch.int64).view(layout.global_shape)
    local = whole if layout.rows is None else whole[layout.rows[0] : layout.rows[1]]
    if layout.tp_dim is not None and layout.tp[1] > 1:
        record = Placement(
            name="", global_shape=layout.global_shape, dim_shards=(("tp", layout.tp_dim),), segments=layout.segments
        )
        local = shard_along(local, record, rank=layout.tp[0], size=layout.tp[1], fill=PADDING)
    flat = local.reshape(-1)
    if layout.flat is not None:
        lo, hi = layout.flat
        flat = flat[lo:hi]
    return flat


def writes_piece(placement: Placement | None, *, coords: RankCoords) -> bool:
    """Whether this rank writes its piece: the first replica along every axis that does not slice
    it; never a synchronised duplicate (the copy of a tied weight on the last pipeline stage)."""
    if placement is not None and placement.duplicate:
        return False
    sliced = set(placement.sharded_axes) if placement is not None else set()
    if sliced & {"ep", "edp"}:  # expert parallel carves dp into ep x edp: the first replica along the rest
        sliced.add("dp")
        if not all(coords.rank(axis) == 0 for axis in ("ep", "edp") if axis not in sliced):
            return False
    if "zshard" in sliced:  # hybrid sharding carves dp into zshard x zrep: the first shard group writes
        sliced.add("dp")
        if coords.rank("zrep") != 0:
            return False
    return all(coords.rank(axis) == 0 for axis in AXES if axis not in sliced)
