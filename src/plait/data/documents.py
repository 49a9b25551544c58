"""Packed documents: position ids that restart where each document starts.

A packed row holds the end of one document, whole documents and the start of
another, each ending with the end-of-text token. With ``data.document_mask``
the loader adds ``position_ids`` that restart at 0 after every end-of-text
token; plait's models read a (batch, seq) ``position_ids`` as the documents'
boundaries (``plait.models.layers.document_causal_mask``), so no token
attends across a boundary and positions count from each document's start.
"""

from __future__ import annotations

import torch


def document_positions(input_ids: torch.Tensor, *, eot_id: int) -> torch.Tensor:
    """(batch, seq) positions counting from 0 at each row's start and after each ``eot_id``.

    The end-of-text token belongs to the document it ends.

    Example:
        >>> document_positions(torch.tensor([[5, 9, 0, 7, 0, 3]]), eot_id=0).tolist()
        [[0, 1, 2, 0, 1, 0]]
    """
    seq = input_ids.shape[-1]
    index = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 1:] = input_ids[..., :-1] == eot_id
    starts[..., 0] = True
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - last_start
