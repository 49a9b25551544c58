"""One ring block through torch's fused CPU flash-attention kernel, with the block's log-sum-exp.

``aten::_scaled_dot_product_flash_attention_for_cpu`` returns a block's normalised output and its
lse (batch, heads, queries), which is all the ring's online-softmax merge needs; its backward,
given the MERGED output and lse, recomputes the block's probabilities as exp(scores - merged lse)
and its delta as rowsum(d_out * merged out), so it returns exactly this block's share of
dq/dk/dv (FlashAttention-2's scheme). It takes grouped-query k/v (fewer heads) as they are, and a
float mask added to the scores; it runs on CPU tensors only (``fused_supported``).
"""

from __future__ import annotations

import torch

_FUSED_DTYPES = (torch.float32, torch.float64)


def fused_supported(q: torch.Tensor) -> bool:
    """Whether the fused CPU kernel can compute this block (else the tiled fp32 kernels in ``blocks``)."""
    return q.device.type == "cpu" and q.dtype in _FUSED_DTYPES


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True: visible) as the float mask the kernel adds to the scores."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def fused_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (batch, heads, queries, head_dim), lse (batch, heads, queries)) of one block.

    ``causal``: query i sees keys 0..i (the diagonal block, equal lengths); ``mask``: a bool
    (queries, keys) or (batch, 1, queries, keys) mask, used instead of ``causal`` (not with it).
    """
    assert not (causal and mask is not None), "fold the causal mask into `mask`"
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
    )
    if mask is not None:  # the kernel gives a row that sees no key lse 0; the merge needs -inf
        lse = lse.masked_fill(~mask.any(dim=-1).expand(lse.shape), float("-inf"))
    return out, lse


def fused_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block (dk/dv with k's heads); ``grad`` is (d_out, merged out, merged lse)."""
    d_out, out, lse = grad
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
    )
