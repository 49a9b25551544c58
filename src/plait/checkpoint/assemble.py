"""Moving checkpoint pieces between layouts with block copies.

A piece is a flat range of one tp rank's slice of the whole tensor (see
layout.py). Without tensor parallel on either side a piece is a contiguous
range of the whole tensor, so a reader copies just the overlaps. Otherwise
the pieces of each tp rank are laid end to end into that rank's slice, the
slices are placed into the whole tensor segment by segment, and the reader
cuts its own slice back out: memcpy work, no per-element index.
(`layout.global_indices` states the same mapping element by element; the
tests hold the two to each other.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from plait.checkpoint.layout import PieceLayout
from plait.distributed.placement import Placement, shard_along


class MissingPart(ValueError):
    """The pieces do not cover what was asked for."""


@dataclass(frozen=True)
class SourcePiece:
    layout: PieceLayout
    load: Callable[[], torch.Tensor]  # the piece's data (any shape; read flat)
    load_range: Callable[[int, int], torch.Tensor] | None = None  # elements [a, b) of the flat piece


def is_sliced(layout: PieceLayout) -> bool:
    return layout.tp_dim is not None and layout.tp[1] > 1


def local_shape(layout: PieceLayout) -> tuple[int, ...]:
    """The shape of one tp rank's slice (before any flat range): segments split, padded rows."""
    shape = list(layout.global_shape)
    if layout.rows is not None:
        shape[0] = layout.rows[1] - layout.rows[0]
    if is_sliced(layout):
        dim, size = layout.tp_dim, layout.tp[1]
        assert dim is not None
        shape[dim] = sum(s // size for s in layout.segments) if layout.segments else -(-shape[dim] // size)
    return tuple(shape)


def _flat_bounds(layout: PieceLayout, numel: int) -> tuple[int, int]:
    return layout.flat if layout.flat is not None else (0, numel)


def _record(layout: PieceLayout) -> Placement:
    assert layout.tp_dim is not None
    return Placement(
        name="", global_shape=layout.global_shape, dim_shards=(("tp", layout.tp_dim),), segments=layout.segments
    )


def take_local(whole: torch.Tensor, layout: PieceLayout) -> torch.Tensor:
    """The flat piece a rank with `layout` holds, cut from the whole tensor (zeros where it pads)."""
    whole = _rows(whole, layout)
    local = shard_along(whole, _record(layout), rank=layout.tp[0], size=layout.tp[1]) if is_sliced(layout) else whole
    flat = local.reshape(-1)
    lo, hi = _flat_bounds(layout, flat.numel())
    return flat[lo:hi].clone()


def place_local(whole: torch.Tensor, local: torch.Tensor, layout: PieceLayout) -> None:
    """Copy one tp rank's whole slice into its place in `whole` (the padding rows dropped)."""
    whole = _rows(whole, layout)
    if not is_sliced(layout):
        whole.copy_(local)
        return
    dim, (rank, size) = layout.tp_dim, layout.tp
    assert dim is not None
    if layout.segments:
        source = target = 0
        for segment in layout.segments:
            part = segment // size
            whole.narrow(dim, target + rank * part, part).copy_(local.narrow(dim, source, part))
            source, target = source + part, target + segment
        return
    rows = whole.shape[dim]
    per_rank = local.shape[dim]
    valid = max(0, min(per_rank, rows - rank * per_rank))
    if valid:
        whole.narrow(dim, rank * per_rank, valid).copy_(local.narrow(dim, 0, valid))


def _rows(whole: torch.Tensor, layout: PieceLayout) -> torch.Tensor:
    """The rows of dim 0 a layout's tp slice is cut from (an ep rank's experts), as a view."""
    return whole if layout.rows is None else whole.narrow(0, layout.rows[0], layout.rows[1] - layout.rows[0])


def _distinct(pieces: list[SourcePiece]) -> list[SourcePiece]:
    """One piece per layout: replicas (a scalar every rank wrote, a buffer two stages hold) count once."""
    seen: dict[PieceLayout, SourcePiece] = {}
    for piece in pieces:
        seen.setdefault(piece.layout, piece)
    return list(seen.values())


def copy_ranges(pieces: list[SourcePiece], *, start: int, stop: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Elements [start, stop) of the whole flat tensor, from pieces that are contiguous ranges of it."""
    out = torch.empty(stop - start, dtype=dtype)
    covered = 0
    for piece in _distinct(pieces):
        lo, hi = _flat_bounds(piece.layout, math.prod(piece.layout.global_shape))
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        if piece.load_range is not None:
            data = piece.load_range(a - lo, b - lo)
        else:
            data = piece.load().reshape(-1)[a - lo : b - lo]
        out[a - start : b - start] = data
        covered += b - a
    if covered != stop - start:
        raise MissingPart(f"{what}: the pieces cover {covered} of the {stop - start} elements asked for")
    return out


def assemble(pieces: list[SourcePiece], *, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """The whole tensor from every tp rank's flat pieces."""
    whole = torch.zeros(shape, dtype=dtype)
    by_slice: dict[PieceLayout, list[SourcePiece]] = {}
    for piece in _distinct(pieces):
        by_slice.setdefault(replace(piece.layout, flat=None), []).append(piece)
    sizes = {key.tp[1] for key in by_slice if is_sliced(key)}
    ranks = {key.tp[0] for key in by_slice if is_sliced(key)}
    if len(sizes) > 1 or (sizes and ranks != set(range(sizes.pop()))):
        raise MissingPart(f"{what}: the tensor-parallel slices saved are incomplete or inconsistent")
    for key, group in by_slice.items():
        shape_local = local_shape(key)
        numel = math.prod(shape_local)
        if len(group) == 1 and group[0].layout.flat is None:  # the rank's whole slice in one piece
            local = group[0].load().reshape(-1)
        else:
            local = copy_ranges(group, start=0, stop=numel, dtype=dtype, what=what)
        if local.numel() != numel:
            raise MissingPart(f"{what}: a piece holds {local.numel()} elements where its layout says {numel}")
        place_local(whole, local.view(shape_local), key)
    return whole
