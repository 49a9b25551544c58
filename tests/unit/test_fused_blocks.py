"""The fused CPU kernel for one ring block against the tiled kernels: causal, visible, masked, grouped-query."""

from __future__ import annotations

import pytest
import torch

from plait.context.blocks import tiled_backward, tiled_forward
from plait.context.fused import fused_backward, fused_forward

HEADS, KV_HEADS, QUERIES, HEAD_DIM = 4, 2, 12, 8


def inputs(num_keys: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    q, d_out = (torch.randn(2, HEADS, QUERIES, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, KV_HEADS, num_keys, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, d_out


def case_mask(case: str, num_keys: int) -> tuple[bool, torch.Tensor | None]:
    if case == "causal":
        return True, None
    if case == "visible":
        return False, None
    mask = torch.rand(2, 1, QUERIES, num_keys, generator=torch.Generator().manual_seed(6)) < 0.5
    mask[1, 0, 3] = False  # a query row that sees no key of this block
    return False, mask


@pytest.mark.parametrize("case,num_keys", [("causal", QUERIES), ("visible", 7), ("masked", 9)])
def test_fused_block_matches_tiled(case: str, num_keys: int) -> None:
    q, k, v, d_out = inputs(num_keys)
    causal, mask = case_mask(case, num_keys)
    out, lse = fused_forward(q, k, v, scale=0.4, causal=causal, mask=mask)
    want_out, want_lse = tiled_forward(q, k, v, scale=0.4, causal=causal, mask=mask)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    # a merged lse from other blocks as well: the backward gives this block's share only
    other = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(8))
    merged_lse = torch.logaddexp(lse, other)
    merged_out = out * torch.exp(lse - merged_lse).nan_to_num()[..., None]
    grad = (d_out, merged_out, merged_lse)
    got = fused_backward(q, k, v, grad=grad, scale=0.4, causal=causal, mask=mask)
    want = tiled_backward(q, k, v, grad=grad, scale=0.4, causal=causal, mask=mask)
    for name, mine, theirs in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, msg=name)
