"""Checkpoint pieces moved between layouts by block copies agree with the element-wise index mapping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from plait.checkpoint.assemble import MissingPart, SourcePiece, assemble, copy_ranges, local_shape, take_local
from plait.checkpoint.layout import PADDING, PieceLayout, global_indices

# (global shape, tp dim, segments): a column weight, a fused q/k/v, a row weight, padded vocabulary rows, a bias
TENSORS = [((12, 6), 0, ()), ((16, 4), 0, (8, 4, 4)), ((6, 12), 1, ()), ((11, 4), 0, ()), ((12,), 0, (4, 4, 4))]


def pieces_of(whole: torch.Tensor, *, tp_dim: int | None, segments: tuple[int, ...], tp: int, cuts: int, seed: int):
    """Every rank's pieces under tp ranks, each tp slice cut into `cuts` flat ranges (ZeRO over dp)."""
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    for rank in range(tp):
        base = PieceLayout(tuple(whole.shape), tp_dim=tp_dim if tp > 1 else None, segments=segments, tp=(rank, tp))
        numel = math.prod(local_shape(base))
        bounds = sorted(torch.randperm(numel - 1, generator=generator)[: cuts - 1].add(1).tolist())
        for lo, hi in itertools.pairwise([0, *bounds, numel]):
            layout = PieceLayout(base.global_shape, base.tp_dim, segments, base.tp, (lo, hi) if cuts > 1 else None)
            indices = global_indices(layout)
            data = torch.where(indices >= 0, whole.reshape(-1)[indices.clamp(min=0)], torch.zeros(()))
            pieces.append(SourcePiece(layout=layout, load=lambda d=data: d))
    return pieces


def expected_piece(whole: torch.Tensor, layout: PieceLayout) -> torch.Tensor:
    indices = global_indices(layout)
    return torch.where(indices != PADDING, whole.reshape(-1)[indices.clamp(min=0)], torch.zeros(()))


@pytest.mark.parametrize(("shape", "dim", "segments"), TENSORS)
@pytest.mark.parametrize(("tp_from", "cuts_from"), [(1, 3), (2, 1), (2, 2), (4, 3)])
def test_block_copies_match_the_index_mapping(shape, dim, segments, tp_from, cuts_from) -> None:
    whole = torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).view(shape)
    pieces = pieces_of(whole, tp_dim=dim, segments=segments, tp=tp_from, cuts=cuts_from, seed=tp_from * 10 + cuts_from)
    assert torch.equal(assemble(pieces, shape=shape, dtype=whole.dtype, what="t"), whole)
    for tp_to, flat in itertools.product((1, 2, 4), (None, (1, 5))):
        for rank in range(tp_to):
            layout = PieceLayout(
                shape, tp_dim=dim if tp_to > 1 else None, segments=segments, tp=(rank, tp_to), flat=flat
            )
            got = take_local(whole, layout)
            assert torch.equal(got, expected_piece(whole, layout)), (tp_to, rank, flat)


def test_ranges_read_only_the_overlaps_and_notice_a_gap() -> None:
    whole = torch.arange(20, dtype=torch.float32)
    pieces = pieces_of(whole, tp_dim=None, segments=(), tp=1, cuts=4, seed=0)
    assert torch.equal(copy_ranges(pieces, start=3, stop=17, dtype=torch.float32, what="t"), whole[3:17])
    with pytest.raises(MissingPart, match=r"cover \d+ of the 20"):
        copy_ranges(pieces[1:], start=0, stop=20, dtype=torch.float32, what="t")
    sliced = pieces_of(whole.view(4, 5), tp_dim=0, segments=(), tp=2, cuts=1, seed=0)
    with pytest.raises(MissingPart, match="incomplete"):
        assemble(sliced[:1], shape=(4, 5), dtype=torch.float32, what="t")
