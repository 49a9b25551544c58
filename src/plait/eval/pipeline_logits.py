"""Full logits from a pipeline-parallel engine, on every pipeline rank, for `plait.eval.scorer.Scorer`.

Under pp a rank holds only its stages, so ``engine.model`` cannot map ids to logits. `PipelineLogits`
runs one batch through the engine's forward-only pipeline pass, keeps the last stage's logits
(vocabulary-parallel ones gathered first) and broadcasts them over the pipeline group: every pipeline
rank of a dp index then scores the same rows and decides the same greedy tokens, so all of them run
the same number of forwards (each one is collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from plait.losses import logits_of
from plait.pipeline.schedules_base import stage_location
from plait.tensor.cross_entropy import gather_vocab_logits, is_vocab_sharded


class PipelineLogits(nn.Module):
    """``forward(input_ids)`` -> fp32 logits (batch, seq, vocab) over the whole vocabulary, on every pp rank.

    Its modules are this rank's pipeline chunks (so ``parameters()`` gives the device and ``eval()``
    reaches every layer). It has no KV cache: `plait.train.decoding.IncrementalDecoder` treats it as a
    plain module and greedy decoding runs whole rows.
    """

    def __init__(self, engine: Any) -> None:
        super().__init__()
        if engine.pipeline is None:
            raise ValueError("PipelineLogits needs an engine with pp > 1; use engine.model directly otherwise")
        runner = engine.pipeline.runner
        self.chunks = nn.ModuleList(runner.chunks)
        self._runner = runner
        self._group = engine.mesh.group("pp")
        last_rank, _ = stage_location(runner.num_stages - 1, runner.num_ranks)
        self._source = dist.get_process_group_ranks(self._group)[last_rank]  # global rank of the last stage
        self._device = engine.device

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch = {self._runner.input_key: input_ids.to(self._device)}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask.to(self._device)
        kept: list[torch.Tensor] = []

        def keep(output: Any, _batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            kept.append(_full_vocab(logits_of(output)))
            return torch.zeros(()), torch.zeros(())

        self._runner.forward_only([batch], loss_fn=keep)
        return self._broadcast(kept[0] if kept else None)

    def _broadcast(self, logits: torch.Tensor | None) -> torch.Tensor:
        """The last stage's logits on every pp rank (the shape first: the vocabulary may be padded)."""
        shape = torch.zeros(3, dtype=torch.int64, device=self._device)
        if logits is not None:
            shape.copy_(torch.tensor(logits.shape))
        dist.broadcast(shape, src=self._source, group=self._group)
        if logits is None:
            logits = torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=self._device)
        dist.broadcast(logits, src=self._source, group=self._group)
        return logits


def _full_vocab(logits: torch.Tensor) -> torch.Tensor:
    """fp32, contiguous, over the whole vocabulary (tensor-parallel peers of the last stage gather together)."""
    if is_vocab_sharded(logits) is not None:
        logits = gather_vocab_logits(logits)
    return logits.float().contiguous()
