"""Where each cp rank's tokens sit in the whole sequence (the load-balanced split).

A row of ``seq`` tokens is cut into ``2 * cp`` equal chunks; cp rank ``r`` holds chunk ``r``
and chunk ``2 * cp - 1 - r``, so under a causal mask every rank does the same attention work.
"""

from __future__ import annotations

import torch


def chunk_size(seq: int, cp: int) -> int:
    """Tokens per chunk; raises when ``seq`` does not split into ``2 * cp`` chunks."""
    if seq % (2 * cp):
        raise ValueError(
            f"sequence length {seq} does not split into 2 * plan.cp = {2 * cp} equal chunks (each cp rank holds "
            f"one from the front and one from the back); use a multiple of {2 * cp} tokens per row"
        )
    return seq // (2 * cp)


def token_index(rank: int, cp: int, *, chunk: int, device: torch.device | None = None) -> torch.Tensor:
    """(2 * chunk,) the global positions of rank ``rank``'s tokens, in local order.

    Example:
        >>> token_index(0, 2, chunk=2).tolist()
        [0, 1, 6, 7]
    """
    front = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    back_start = (2 * cp - 1 - rank) * chunk
    back = torch.arange(back_start, back_start + chunk, device=device)
    return torch.cat([front, back])


def visible_pieces(q_rank: int, kv_rank: int, *, chunk: int) -> tuple[slice, slice, bool]:
    """Which local queries of ``q_rank`` see which keys of ``kv_rank`` under the causal mask, and
    whether that piece needs a mask: (query slice, key slice, masked).

    Its own block needs the causal mask; a rank with a lower index gives its front chunk to all
    queries (its back chunk is later than both of ours); a higher one gives both chunks to our
    back chunk only (its front chunk is later than ours, its back chunk earlier than our back).
    """
    whole, front, back = slice(0, 2 * chunk), slice(0, chunk), slice(chunk, 2 * chunk)
    if kv_rank == q_rank:
        return whole, whole, True
    if kv_rank < q_rank:
        return whole, front, False
    return back, whole, False
