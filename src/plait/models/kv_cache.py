"""Incremental decoding: keys and values of the positions seen so far, kept so each new token costs
one forward over itself instead of over the whole prefix.

`KVCache` serves plait's GPT (``GPT.decode``, an inference-only path beside the training forward);
`plait.train.decoding.IncrementalDecoder` drives it, and Hugging Face models' own caches.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Per-layer keys and values (batch, kv_heads, positions, head_dim), in buffers of ``capacity``
    positions allocated on first use, and which past positions are real tokens (left padding).

    ``reserve`` opens a step (checks the room, returns the new positions' position ids); each attention
    layer then ``append``s its new keys/values and attends over what ``append`` returns.
    """

    def __init__(self, *, num_layers: int, capacity: int) -> None:
        if num_layers < 1 or capacity < 1:
            raise ValueError(f"KVCache(num_layers={num_layers}, capacity={capacity}): both must be >= 1")
        self.capacity = capacity
        self.length = 0  # positions held, the current step's included once reserved
        self.num_new = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._real: torch.Tensor | None = None  # (batch, length) bool; None while there is no padding
        self._next_position: torch.Tensor | None = None  # (batch,) with padding

    def reserve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Open a step for ``input_ids`` (batch, new): the new positions' ids, (new,) or (batch, new).

        ``attention_mask`` (batch, new), 0 on padding, may be given on any step (left-padded prompts);
        padding then takes no position and no later token attends to it.
        """
        batch, num_new = input_ids.shape
        if self.length + num_new > self.capacity:
            raise ValueError(
                f"the cache holds {self.length} positions and the step adds {num_new}, past the model's "
                f"context of {self.capacity}; generate fewer tokens or shorten the prompt"
            )
        start, device = self.length, input_ids.device
        self.length, self.num_new = start + num_new, num_new
        if attention_mask is None and self._real is None:
            return torch.arange(start, start + num_new, device=device)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self._real is None:
            self._real = torch.ones(batch, start, dtype=torch.bool, device=device)
            self._next_position = torch.full((batch,), start, device=device)
        self._real = torch.cat([self._real, real], dim=1)
        positions = self._next_position[:, None] + real.long().cumsum(dim=1) - 1
        self._next_position = positions[:, -1] + 1
        return positions.clamp(min=0)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s new keys/values (batch, kv_heads, new, head_dim); all held so far."""
        if self._keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self._keys[layer], self._values[layer] = k.new_empty(shape), v.new_empty(shape)
        keys, values = self._keys[layer], self._values[layer]
        assert keys is not None and values is not None
        keys[:, :, self.length - self.num_new : self.length] = k
        values[:, :, self.length - self.num_new : self.length] = v
        return keys[:, :, : self.length], values[:, :, : self.length]

    def attention_mask(self, device: torch.device) -> torch.Tensor | None:
        """(batch or 1, 1, new, length) bool, True where a new position may attend; None: all of the past
        (one new position and no padding).

        A query always sees itself, so a padding row attends to something and stays finite.
        """
        if self.num_new == 1 and self._real is None:
            return None
        query = torch.arange(self.length - self.num_new, self.length, device=device)[:, None]
        key = torch.arange(self.length, device=device)[None, :]
        visible = (key <= query)[None, None]
        if self._real is not None:
            visible = (visible & self._real[:, None, None, :]) | (key == query)
        return visible
