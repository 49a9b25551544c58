"""Context parallel: each cp rank holds two chunks of every sequence; attention runs over the cp ring.

``layout`` says which tokens a rank holds, ``ring`` passes key/value blocks around the cp group
(forward and backward rings, fp32 online softmax), ``attention`` is what a model's
``context_attention`` slot gets.
"""

from plait.context.attention import RingAttention
from plait.context.layout import chunk_size, token_index

__all__ = ["RingAttention", "chunk_size", "token_index"]
