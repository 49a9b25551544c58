"""Packed documents' attention mask: made once per batch in the additive form SDPA uses, shared by every layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.models.layers import document_attention_mask, document_causal_mask


def test_one_additive_mask_per_batch_with_the_bool_masks_results() -> None:
    positions = torch.cat([torch.arange(5), torch.arange(11)]).repeat(2, 1)
    mask = document_attention_mask(positions, torch.float32)
    assert document_attention_mask(positions, torch.float32) is mask  # the next layer's call
    assert document_attention_mask(positions, torch.bfloat16).dtype == torch.bfloat16
    visible = document_causal_mask(positions)
    assert torch.equal(mask == 0, visible) and bool(torch.isneginf(mask[~visible]).all())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=visible),
        rtol=0,
        atol=0,
    )
