"""Ring attention's block kernels: tiling the queries changes nothing, and they match autograd."""

from __future__ import annotations

import torch

from plait.context.blocks import block_backward, block_forward


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    q, d_out = (torch.randn(2, 3, 13, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 13, 11, generator=gen) < 0.6
    mask[0, 0, 4] = False  # a query row that sees no key of this block
    return q, k, v, d_out, mask


def test_tiles_match_one_pass_and_autograd() -> None:
    q, k, v, d_out, mask = inputs()
    out, lse = block_forward(q, k, v, scale=0.3, mask=mask, tile=1000)
    tiled_out, tiled_lse = block_forward(q, k, v, scale=0.3, mask=mask, tile=4)
    torch.testing.assert_close(tiled_out, out)
    torch.testing.assert_close(tiled_lse, lse)
    assert torch.isinf(lse[0, :, 4]).all() and (out[0, :, 4] == 0).all()
    delta = (d_out * out).sum(-1)
    grads = block_backward(q, k, v, grad=(d_out, lse, delta), scale=0.3, mask=mask, tile=4)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    expected = torch.nan_to_num(torch.softmax(scores, dim=-1)) @ v
    expected.backward(d_out)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want)
