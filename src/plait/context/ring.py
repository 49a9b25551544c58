"""Ring attention over the cp group: key/value blocks travel the ring while each block is computed.

Forward: cp steps; at each, this rank starts sending the key/value block it holds to the next
rank and receiving the previous rank's, computes its queries against the block it holds, and
merges the result (online softmax, fp32). Backward is a second ring: key/value blocks travel
again, and each block's dK/dV accumulator follows it from the rank after its owner, each rank
adding its share, until after cp - 1 hops it is back with the owner, which adds its own.
Each block's kernel is picked in ``plait.context.blocks`` (fused on CPU, tiled elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from plait.context.blocks import attend_backward, attend_forward, merge_into
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

    def piece(self, source: int, device: torch.device) -> Piece:
        """Which of our queries see which keys of `source`'s block, and how."""
        rows, cols, masked = visible_pieces(self.rank, source, chunk=self.chunk)
        if self.starts is None:  # the diagonal block: positions increase in local order, so plain causal
            return Piece(rows, cols, causal=masked, mask=None)
        mask = self.starts[self.rank][:, rows, None] == self.starts[source][:, None, cols]  # the same document
        if masked:
            mask &= self.index(source, device)[None, cols] <= self.index(self.rank, device)[rows, None]
        return Piece(rows, cols, causal=False, mask=mask[:, None])  # (batch, 1, queries, keys)


@dataclass(frozen=True)
class Piece:
    """Our query rows and the block's key columns that meet, under a causal mask or a bool mask (or none)."""

    rows: slice
    cols: slice
    causal: bool  # query i sees keys 0..i of the piece
    mask: torch.Tensor | None  # True: visible; packed documents (the causal part folded in)


def ring_forward(
    q: torch.Tensor, kv: torch.Tensor, *, ring: Ring, masks: Masks, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (batch, heads, seq, head_dim) and lse (batch, heads, seq) in fp32; ``kv`` is stack(k, v),
    with kv heads (a divisor of the query heads: grouped-query attention)."""
    out = lse = None
    for step in range(ring.size):
        incoming = ring.shift(kv) if step < ring.size - 1 else None
        piece = masks.piece((ring.rank - step) % ring.size, q.device)
        k, v = kv[0][:, :, piece.cols], kv[1][:, :, piece.cols]
        block = attend_forward(q[:, :, piece.rows], k, v, scale=scale, causal=piece.causal, mask=piece.mask)
        if out is None:  # step 0 is our own block, all rows: it starts the running result
            out, lse = block
        else:
            merge_into(out, lse, block, piece.rows)
        if incoming is not None:
            kv = incoming.wait()
    assert out is not None and lse is not None
    return out, lse


def _share(kv: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cols: slice) -> torch.Tensor:
    """stack(dk, dv) placed at the block's key columns ``cols`` (zeros elsewhere)."""
    if cols == slice(0, kv.shape[3]):
        return torch.stack([dk, dv])
    share = torch.zeros_like(kv)
    share[0][:, :, cols] = dk
    share[1][:, :, cols] = dv
    return share


def ring_backward(
    q: torch.Tensor, kv: torch.Tensor, *, grad: tuple[torch.Tensor, ...], ring: Ring, masks: Masks, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq and stack(dk, dv) of this rank's blocks; ``grad`` is (d_out, out, lse), all fp32.

    Step 0 computes this rank's share of its own block's dK/dV and keeps it. Each later step
    computes its share of the held block, adds the share the ranks before it accumulated (which
    arrived while it computed) and sends the sum on; after cp - 1 hops each block's sum reaches
    its owner, which adds its own share.
    """
    d_out, out, lse = grad
    dq = own = accumulated = None
    for step in range(ring.size):
        incoming = ring.shift(kv) if step < ring.size - 1 else None
        piece = masks.piece((ring.rank - step) % ring.size, q.device)
        rows, cols = piece.rows, piece.cols
        block_grad = (d_out[:, :, rows], out[:, :, rows], lse[:, :, rows])
        k, v = kv[0][:, :, cols], kv[1][:, :, cols]
        dq_piece, dk, dv = attend_backward(
            q[:, :, rows], k, v, grad=block_grad, scale=scale, causal=piece.causal, mask=piece.mask
        )
        share = _share(kv, dk, dv, cols)
        if dq is None:  # step 0: our own block, all rows
            dq, own = dq_piece, share
        else:
            dq[:, :, rows] += dq_piece
            if accumulated is not None:
                share += accumulated.wait()
            accumulated = ring.shift(share)
        if incoming is not None:
            kv = incoming.wait()
    assert dq is not None and own is not None
    return dq, own if accumulated is None else own + accumulated.wait()


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
