"""Tasks on the text corpus: what a batch of token rows becomes before the model sees it.

A task turns the rows the loader reads (`sample_tokens(seq_len)` tokens each, the same global order
under every plan) into the model's inputs and labels, and names the loss that counts its tokens:

    task = text_task("masked_lm", vocab_size=8192, seed=0)
    loader = ShardedLoader(TokenDataset(path, dtype=..., seq_len=task.sample_tokens(128)), ...,
                           batch_maker=task.make_batch)
    engine = plait.boost(model, loss_fn=task.loss_fn, ...)

Every random choice (which tokens to mask, where spans fall, whether segments swap) comes from a
generator seeded by (task stream, seed, the sample's global position), never from a rank's own
generator: any plan, and a run resumed under another, sees the same samples.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from plait.data.loader import make_batch
from plait.losses import ChunkedCausalLM, causal_lm

Batch = dict[str, torch.Tensor]


class TextTask(Protocol):
    """What `plait train` asks of a task on the text corpus."""

    kind: str
    loss_fn: Any  # loss_fn(outputs, batch) -> (loss_sum, count), with count_tokens (the step's divisor)

    def sample_tokens(self, seq_len: int) -> int:
        """Corpus tokens each sample reads for a model input of `seq_len` positions."""
        ...

    def make_batch(self, rows: torch.Tensor, positions: np.ndarray) -> Batch:
        """The model's batch from `rows` (n, sample_tokens) at global stream `positions` (n,)."""
        ...


def sample_rng(stream: int, seed: int, position: int) -> np.random.Generator:
    """The generator of one sample's random choices: a function of (stream, seed, position) only."""
    return np.random.default_rng([stream, seed, int(position)])


class CausalLMTask:
    """Next-token prediction (the default): rows as they are, labels equal to the inputs (the loss
    shifts them), per-document positions when `eot_id` is given."""

    kind = "causal_lm"

    def __init__(self, *, eot_id: int | None = None, loss_chunk: int = 0) -> None:
        self.eot_id = eot_id
        self.loss_fn = ChunkedCausalLM(loss_chunk) if loss_chunk else causal_lm  # train.loss_chunk

    def sample_tokens(self, seq_len: int) -> int:
        return seq_len

    def make_batch(self, rows: torch.Tensor, positions: np.ndarray) -> Batch:
        return make_batch(rows, eot_id=self.eot_id)
