"""The attention a model's ``context_attention`` slot gets under context parallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from plait.context.layout import token_index
from plait.context.ring import Masks, Ring, RingAttentionFunction


class RingAttention:
    """``(q, k, v, position_ids=...)`` -> attention output, over the cp ring.

    ``q``/``k``/``v`` are (batch, heads, 2 * chunk, head_dim): this rank's two chunks
    (``plait.context.layout``). ``position_ids`` of shape (batch, seq) mark packed documents
    (restarting at 0 at each document): a token's document starts at its global position minus
    its position id, and attention stays inside a document, as ``document_causal_mask`` does
    on the whole sequence.
    """

    def __init__(self, ring: Ring) -> None:
        self.ring = ring

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, position_ids: Any = None) -> torch.Tensor:
        chunk = q.shape[2] // 2
        starts = None
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            index = token_index(self.ring.rank, self.ring.size, chunk=chunk, device=q.device)
            starts = self._gather(index[None] - position_ids)
        masks = Masks(rank=self.ring.rank, size=self.ring.size, chunk=chunk, starts=starts)
        return RingAttentionFunction.apply(q, k, v, self.ring, masks)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """(cp, batch, 2 * chunk): every cp rank's document starts (a few integers per token)."""
        parts = [torch.empty_like(local) for _ in range(self.ring.size)]
        dist.all_gather(parts, local.contiguous(), group=self.ring.group)
        return torch.stack(parts)

    def __deepcopy__(self, memo: dict[int, Any]) -> RingAttention:
        return self
