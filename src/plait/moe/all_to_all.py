"""Expert-parallel dispatch: token slots to the ep rank holding their expert and back, by all-to-all.

Ep rank r holds experts ``[r * n, (r + 1) * n)`` (n = num_experts / ep). Slots arrive
sorted by global expert, so each destination's slots are one contiguous run: a single
``all_to_all_single`` with uneven split sizes moves them, after a small all-to-all of
``tokens_per_expert`` tells every rank how many rows it receives per (source, local
expert). What arrives is ordered by source rank, then local expert; one stable sort
regroups it by local expert for ``Experts``. ``combine`` undoes the sort, then sends
the outputs back with the split sizes swapped. Backward of each exchange is the
reverse exchange (``_AllToAll``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.distributed.comm import CommCounter
from plait.moe.dispatch import Dispatched


@dataclass
class ExchangeState:
    """What ``combine`` needs to send expert outputs back where ``dispatch`` got them."""

    send_splits: list[int]  # rows this rank sent to each ep rank
    recv_splits: list[int]  # rows this rank received from each ep rank
    order: torch.Tensor  # (S_local,) received row of each expert-sorted row


@dataclass(frozen=True)
class Exchange:
    """An ep group and where its traffic is counted."""

    group: dist.ProcessGroup
    rank: int
    size: int
    counter: CommCounter | None = None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward sends gradients back with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, exchange: Exchange, send: list[int], recv: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.exchange, ctx.send, ctx.recv = exchange, send, recv
        return exchange_rows(x, exchange=exchange, send=send, recv=recv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return exchange_rows(grad.contiguous(), exchange=ctx.exchange, send=ctx.recv, recv=ctx.send), None, None, None


def exchange_rows(x: torch.Tensor, *, exchange: Exchange, send: list[int], recv: list[int]) -> torch.Tensor:
    """Rows ``send[r]`` of ``x`` (in order) to ep rank r; returns the ``recv[r]`` rows from each rank r."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    if exchange.counter is not None:
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        others = sum(send) - send[exchange.rank]
        exchange.counter.record("all_to_all", x, group=exchange.group, axis="ep", sent=others * row_bytes)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=exchange.group)
    return out


class AllToAllDispatch:
    """The ``Dispatch`` of expert parallel (see the module docstring).

    Example (on every rank of an ep group of 2, 4 experts, 2 per rank)::

        layer.experts = sliced_experts          # Experts(config, first_expert=2 * ep_rank, num_local_experts=2)
        layer.dispatch = AllToAllDispatch(Exchange(group, rank=ep_rank, size=2), num_local_experts=2)
    """

    def __init__(self, exchange: Exchange, *, num_local_experts: int) -> None:
        self.exchange = exchange
        self.num_local_experts = num_local_experts

    def _counts(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """(ep, n): rows each ep rank sends to each of this rank's local experts."""
        send = tokens_per_expert.to(torch.int64).contiguous()
        recv = torch.empty_like(send)
        if self.exchange.counter is not None:
            self.exchange.counter.record("all_to_all", send, group=self.exchange.group, axis="ep")
        dist.all_to_all_single(recv, send, group=self.exchange.group)
        return recv.view(self.exchange.size, self.num_local_experts)

    def dispatch(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> Dispatched:
        """``tokens`` (S, d) sorted by global expert -> this rank's experts' rows, sorted by local expert."""
        size, n = self.exchange.size, self.num_local_experts
        if tokens_per_expert.numel() != size * n:
            raise ValueError(
                f"{tokens_per_expert.numel()} experts do not split into {size} ep ranks x {n} local experts; "
                "build the dispatch with num_local_experts = num_experts / ep"
            )
        counts = self._counts(tokens_per_expert)  # (ep, n)
        send = tokens_per_expert.view(size, n).sum(dim=1).tolist()
        recv = counts.sum(dim=1).tolist()
        received = _AllToAll.apply(tokens, self.exchange, send, recv)  # (S_local, d) by source, then expert
        local_expert = torch.arange(n, device=counts.device).repeat(size).repeat_interleave(counts.flatten())
        order = torch.argsort(local_expert, stable=True).to(tokens.device)
        return Dispatched(
            tokens=received[order],
            tokens_per_local_expert=counts.sum(dim=0).tolist(),
            state=ExchangeState(send_splits=send, recv_splits=recv, order=order),
        )

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """Expert outputs (S_local, d) back to the ranks and slots they came from."""
        state: ExchangeState = dispatched.state
        unsorted = torch.empty_like(expert_output).index_copy(0, state.order, expert_output)
        return _AllToAll.apply(unsorted, self.exchange, state.recv_splits, state.send_splits)
