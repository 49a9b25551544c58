"""Attention on one block of keys, in fp32, with the log-sum-exp that merges blocks exactly.

The forward keeps, per query row, ``lse = log sum exp(scores)``; merging two blocks' outputs
weights each by ``exp(lse_block - lse_merged)`` (the online softmax). The backward recomputes a
block's probabilities from the merged ``lse`` (FlashAttention's scheme), so nothing of size
queries x keys is kept between the rings. Both run over tiles of ``QUERY_TILE`` query rows, so the
scores held at once are tile x keys, not queries x keys: memory stays linear in the sequence.

``attend_forward``/``attend_backward`` pick the kernel: torch's fused CPU flash kernel
(``plait.context.fused``) for fp32/fp64 CPU tensors, these tiled kernels otherwise (other devices).
"""

from __future__ import annotations

import torch

from plait.context.fused import fused_backward, fused_forward, fused_supported

QUERY_TILE = 512
MIN_TILE = 16
TILE_SCORES = 512 * 512


def tile_rows(num_keys: int) -> int:
    """Query rows per tile for a block of ``num_keys`` keys."""
    return max(MIN_TILE, min(QUERY_TILE, TILE_SCORES // max(num_keys, 1)))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with rows that see no key (-inf) at 0, so ``scores - lse`` stays -inf there, not nan."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _scores(q: torch.Tensor, k: torch.Tensor, *, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, heads, queries, keys)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def _forward_tile(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _scores(q, k, scale=scale, mask=mask)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse)[..., None])
    return torch.matmul(probs, v), lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, piece: tuple[torch.Tensor, torch.Tensor], rows: slice) -> None:
    """Fold one block's (output, lse) into the running ``out``/``lse`` over query ``rows``, in place."""
    piece_out, piece_lse = piece
    old_lse = lse[:, :, rows]
    merged = torch.logaddexp(old_lse, piece_lse)
    safe = _finite(merged)
    old_weight = torch.exp(old_lse - safe)[..., None]
    new_weight = torch.exp(piece_lse - safe)[..., None]
    out[:, :, rows].mul_(old_weight).add_(piece_out * new_weight)
    old_lse.copy_(merged)


def _backward_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_out, lse, delta = grad
    probs = torch.exp(_scores(q, k, scale=scale, mask=mask) - _finite(lse)[..., None])
    dv = torch.matmul(probs.transpose(-1, -2), d_out)
    d_probs = torch.matmul(d_out, v.transpose(-1, -2))
    d_scores = probs * (d_probs - delta[..., None]) * scale
    return torch.matmul(d_scores, k), torch.matmul(d_scores.transpose(-1, -2), q), dv


def _tiles(num_rows: int, tile: int) -> list[slice]:
    return [slice(start, min(start + tile, num_rows)) for start in range(0, num_rows, tile)]


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[..., rows, :]  # (queries, keys) or (batch, 1, queries, keys)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This block's normalised output (batch, heads, queries, head_dim) and its lse (batch, heads, queries)."""
    tile = tile or tile_rows(k.shape[2])
    pieces = [
        _forward_tile(q[:, :, rows], k, v, scale=scale, mask=_mask_rows(mask, rows))
        for rows in _tiles(q.shape[2], tile)
    ]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([out for out, _ in pieces], dim=2), torch.cat([lse for _, lse in pieces], dim=2)


def block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    mask: torch.Tensor | None,
    tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block; ``grad`` is (d_out, merged lse, delta = rowsum(d_out * out))."""
    tile = tile or tile_rows(k.shape[2])
    dq_tiles, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for rows in _tiles(q.shape[2], tile):
        tile_grad = tuple(g[:, :, rows] for g in grad)
        dq_tile, dk_tile, dv_tile = _backward_tile(
            q[:, :, rows], k, v, grad=tile_grad, scale=scale, mask=_mask_rows(mask, rows)
        )
        dq_tiles.append(dq_tile)
        dk += dk_tile
        dv += dv_tile
    return torch.cat(dq_tiles, dim=2), dk, dv


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


def _full_mask(q: torch.Tensor, k: torch.Tensor, *, causal: bool, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tiled kernels' bool mask: ``causal`` (query i sees keys 0..i) made explicit."""
    if not causal:
        return mask
    return torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()


def attend_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's (output, lse); ``k``/``v`` may have fewer heads (grouped-query), ``mask`` excludes ``causal``."""
    kernel = fused_forward if fused_supported(q) else tiled_forward
    return kernel(q, k, v, scale=scale, causal=causal, mask=mask)


def attend_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's dq, dk, dv (dk/dv with k's heads); ``grad`` is (d_out, merged out, merged lse)."""
    kernel = fused_backward if fused_supported(q) else tiled_backward
    return kernel(q, k, v, grad=grad, scale=scale, causal=causal, mask=mask)


def tiled_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_forward`` through the tiled kernels (any device): kv heads repeated, ``causal`` as a mask."""
    group = q.shape[1] // k.shape[1]
    full = _full_mask(q, k, causal=causal, mask=mask)
    return block_forward(q, _repeat(k, group), _repeat(v, group), scale=scale, mask=full)


def tiled_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attend_backward`` through the tiled kernels: dK/dV folded back onto the kv heads."""
    d_out, out, lse = grad
    group = q.shape[1] // k.shape[1]
    full = _full_mask(q, k, causal=causal, mask=mask)
    tile_grad = (d_out, lse, (d_out * out).sum(dim=-1))
    dq, dk, dv = block_backward(q, _repeat(k, group), _repeat(v, group), grad=tile_grad, scale=scale, mask=full)
    return dq, _fold(dk, group), _fold(dv, group)
