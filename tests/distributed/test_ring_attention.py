"""Ring attention alone (grouped-query heads) against torch's scaled_dot_product_attention on the whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.context.attention import RingAttention
from plait.context.layout import chunk_size, token_index
from plait.context.ring import Ring
from plait.models.layers import document_causal_mask
from tests.distributed.harness import run_ranks

BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 4, 2, 24, 8  # grouped-query: 2 query heads per kv head


def whole_inputs(documents: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    q, d_out = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(SEQ).expand(BATCH, SEQ).clone()
    if documents:  # documents start at 0, 5, 11 in row 0 and at 0, 17 in row 1
        positions[0] = torch.tensor([*range(5), *range(6), *range(13)])
        positions[1] = torch.tensor([*range(17), *range(7)])
    return q, k, v, d_out, positions


def reference(documents: bool) -> tuple[torch.Tensor, ...]:
    q, k, v, d_out, positions = whole_inputs(documents)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    keys, values = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))  # query head h: kv h // 2
    if documents:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=document_causal_mask(positions))
    else:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    out.backward(d_out)
    return out.detach(), q.grad, k.grad, v.grad


def ring_rank(rank: int, world_size: int, documents: bool) -> tuple[torch.Tensor, ...]:
    q, k, v, d_out, positions = whole_inputs(documents)
    index = token_index(rank, world_size, chunk=chunk_size(SEQ, world_size))
    q, k, v = (t[:, :, index].float().requires_grad_() for t in (q, k, v))
    ring = Ring(group=dist.group.WORLD, rank=rank, size=world_size, ranks=list(range(world_size)))
    out = RingAttention(ring)(q, k, v, position_ids=positions[:, index] if documents else index)
    out.backward(d_out[:, :, index].float())
    return index, out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ring_attention_matches_whole_sequence(cp: int, documents: bool) -> None:
    expected = reference(documents)
    for index, *got in run_ranks(ring_rank, cp, documents, timeout_s=60):
        for name, mine, whole in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
            torch.testing.assert_close(mine, whole[:, :, index].float(), rtol=1e-5, atol=1e-6, msg=name)


def test_uneven_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="equal chunks"):
        chunk_size(10, 2)
