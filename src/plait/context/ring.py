"""Ring attention over the cp group: key/value blocks travel the ring while each block is computed.

Forward: cp steps; at each, this rank starts sending the key/value block it holds to the next
rank and receiving the previous rank's, computes its queries against the block it holds, and
merges the result (online softmax, fp32). Backward is a second ring: key/value blocks travel
again, and each block's dK/dV accumulator follows it, each rank adding its share, until after
cp hops it is back with the block's owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from plait.context.blocks import block_backward, block_forward, merge_into
from plait.context.layout import token_index, visible_pieces
from plait.distributed.comm import CommCounter


@dataclass
class Pending:
    """A block on its way in; `wait` returns it once its send and receive are complete."""

    received: torch.Tensor
    works: list[Any]

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


@dataclass
class Ring:
    """The cp group as a ring: this rank sends to the next and receives from the previous."""

    group: dist.ProcessGroup
    rank: int
    size: int
    ranks: list[int]  # global ranks in cp order
    counter: CommCounter | None = field(default=None)

    def shift(self, tensor: torch.Tensor) -> Pending:
        """Start sending ``tensor`` to the next rank and receiving the previous rank's."""
        if self.size == 1:  # a ring of one: the block comes straight back
            return Pending(tensor, [])
        received = torch.empty_like(tensor)
        following, preceding = self.ranks[(self.rank + 1) % self.size], self.ranks[(self.rank - 1) % self.size]
        ops = [
            dist.P2POp(dist.isend, tensor, following, self.group),
            dist.P2POp(dist.irecv, received, preceding, self.group),
        ]
        if self.counter is not None:
            self.counter.record("send", tensor, peer=following)
        return Pending(received, dist.batch_isend_irecv(ops))

    def __deepcopy__(self, memo: dict[int, Any]) -> Ring:
        return self  # process groups do not copy; a copied module still uses this ring


@dataclass
class Masks:
    """Which keys each query may see, from the global positions of the tokens (and their documents)."""

    rank: int
    size: int
    chunk: int
    starts: torch.Tensor | None  # (cp, batch, 2 * chunk) each token's document start; None: one sequence

    def index(self, rank: int, device: torch.device) -> torch.Tensor:
        return token_index(rank, self.size, chunk=self.chunk, device=device)

    def piece(self, source: int, device: torch.device) -> tuple[slice, slice, torch.Tensor | None]:
        """Query rows, key columns and mask (None: all visible) of our queries against `source`'s block."""
        rows, cols, masked = visible_pieces(self.rank, source, chunk=self.chunk)
        mask = None
        if masked:  # (queries, keys)
            mask = self.index(source, device)[None, cols] <= self.index(self.rank, device)[rows, None]
        if self.starts is not None:  # (batch, 1, queries, keys): the same document only
            same = self.starts[self.rank][:, rows, None] == self.starts[source][:, None, cols]
            mask = (same if mask is None else same & mask)[:, None]
        return rows, cols, mask


def _repeat(x: torch.Tensor, group: int) -> torch.Tensor:
    """(batch, kv_heads, keys, head_dim) -> one copy per query head (query head h uses kv head h // group)."""
    if group == 1:
        return x
    batch, heads, keys, head_dim = x.shape
    return x[:, :, None].expand(batch, heads, group, keys, head_dim).reshape(batch, heads * group, keys, head_dim)


def _fold(x: torch.Tensor, group: int) -> torch.Tensor:
    """The gradient of `_repeat`: each kv head's copies summed."""
    if group == 1:
        return x
    batch, heads, keys, head_dim = x.shape
    return x.view(batch, heads // group, group, keys, head_dim).sum(dim=2)


def ring_forward(
    q: torch.Tensor, kv: torch.Tensor, *, ring: Ring, masks: Masks, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (batch, heads, seq, head_dim) and lse (batch, heads, seq) in fp32; ``kv`` is stack(k, v),
    with kv heads (a divisor of the query heads: grouped-query attention)."""
    group = q.shape[1] // kv.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    for step in range(ring.size):
        incoming = ring.shift(kv) if step < ring.size - 1 else None
        rows, cols, mask = masks.piece((ring.rank - step) % ring.size, q.device)
        k, v = _repeat(kv[0][:, :, cols], group), _repeat(kv[1][:, :, cols], group)
        piece = block_forward(q[:, :, rows], k, v, scale=scale, mask=mask)
        merge_into(out, lse, piece, rows)
        if incoming is not None:
            kv = incoming.wait()
    return out, lse


def ring_backward(
    q: torch.Tensor, kv: torch.Tensor, *, grad: tuple[torch.Tensor, ...], ring: Ring, masks: Masks, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq and stack(dk, dv) of this rank's blocks; ``grad`` is (d_out, out, lse), all fp32.

    Each step computes this rank's share of the held block's dK/dV, then adds the share the ranks
    before it accumulated (which arrived while it computed) and sends the sum on.
    """
    d_out, out, lse = grad
    group = q.shape[1] // kv.shape[2]
    delta = (d_out * out).sum(dim=-1)
    dq = torch.zeros_like(q)
    accumulated: Pending | None = None
    for step in range(ring.size):
        incoming = ring.shift(kv) if step < ring.size - 1 else None
        rows, cols, mask = masks.piece((ring.rank - step) % ring.size, q.device)
        block_grad = (d_out[:, :, rows], lse[:, :, rows], delta[:, :, rows])
        k, v = _repeat(kv[0][:, :, cols], group), _repeat(kv[1][:, :, cols], group)
        dq_piece, dk, dv = block_backward(q[:, :, rows], k, v, grad=block_grad, scale=scale, mask=mask)
        dq[:, :, rows] += dq_piece
        share = torch.zeros_like(kv)
        share[0][:, :, cols] = _fold(dk, group)
        share[1][:, :, cols] = _fold(dv, group)
        if accumulated is not None:
            share += accumulated.wait()
        accumulated = ring.shift(share)
        if incoming is not None:
            kv = incoming.wait()
    assert accumulated is not None
    return dq, accumulated.wait()  # after cp hops each block's sum is back with its owner


class RingAttentionFunction(torch.autograd.Function):
    """Causal attention of this rank's queries over every cp rank's keys and values."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, masks: Masks) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        kv = torch.stack([k.float(), v.float()])  # one message per hop
        out, lse = ring_forward(q.float(), kv, ring=ring, masks=masks, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.masks, ctx.scale = ring, masks, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        kv = torch.stack([k.float(), v.float()])
        grad = (d_out.float(), out, lse)
        dq, dkv = ring_backward(q.float(), kv, grad=grad, ring=ctx.ring, masks=ctx.masks, scale=ctx.scale)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
