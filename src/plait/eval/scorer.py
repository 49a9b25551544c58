"""Token-level scoring under a plan: log-likelihoods and greedy continuations, shared over dp ranks.

Every rank sees every request; data-parallel ranks each take every dp-th one and the results are
all-gathered, so every rank returns the same list in request order. Tensor-parallel peers share a
dp rank, run the same batches together and gather the vocabulary-parallel logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from plait.losses import logits_of
from plait.tensor.cross_entropy import gather_vocab_logits, is_vocab_sharded
from plait.train.decoding import IncrementalDecoder

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)
T = TypeVar("T")
PAD_ID = 0  # right padding: a causal model's earlier positions never see it


@dataclass(frozen=True)
class DataRanks:
    """Which share of the requests this rank scores: every ``size``-th from ``rank``; ``group`` gathers them."""

    rank: int = 0
    size: int = 1
    group: Any = None


class Scorer:
    """A causal LM (plait's GPT or a Hugging Face model, possibly tensor-parallel) that scores token ids."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_length: int,
        batch_size: int = 16,
        ranks: DataRanks | None = None,
        kv_cache: bool = True,
    ) -> None:
        self.model = model.eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.ranks = ranks or DataRanks()
        self.kv_cache = kv_cache  # greedy decoding through the model's KV cache (False: the whole row each token)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def logits(self, rows: Sequence[list[int]]) -> torch.Tensor:
        """Full-vocabulary fp32 logits (batch, longest row, vocab) of right-padded rows."""
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], device=self.device)
        return self._full_vocab(logits_of(self.model(input_ids=ids)))

    @staticmethod
    def _full_vocab(logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the whole vocabulary (tensor-parallel peers gather their slices)."""
        if is_vocab_sharded(logits) is not None:
            logits = gather_vocab_logits(logits)
        return logits.float()

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding yields it) per pair."""
        return self._shared(pairs, self._score_share)

    def greedy(
        self, prompts: Sequence[list[int]], *, max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts``, each ending when ``stop(new ids)`` or after ``max_new_tokens``."""
        return self._shared(prompts, lambda share: self._greedy_share(share, max_new_tokens, stop))

    def _shared(self, items: Sequence[Any], work: Callable[[list[Any]], list[T]]) -> list[T]:
        rank, size = self.ranks.rank, self.ranks.size
        mine = work(list(items[rank::size]))
        if size == 1:
            return mine
        parts: list[Any] = [None] * size
        dist.all_gather_object(parts, mine, group=self.ranks.group)
        return [parts[index % size][index // size] for index in range(len(items))]

    def _score_share(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [self._window(*pairs[i]) for i in batch]
            logits = self.logits([row for row, _ in rows])
            for row_index, (i, (row, num_scored)) in enumerate(zip(batch, rows, strict=True)):
                results[i] = _continuation_score(logits[row_index], row, pairs[i][1][-num_scored:])
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """The model's input (the last max_length tokens before the final one) and how many targets it scores."""
        if not continuation:
            raise ValueError("a loglikelihood request with an empty continuation scores nothing")
        whole = (context + continuation)[-(self.max_length + 1) :]
        return whole[:-1], min(len(continuation), len(whole) - 1)

    def _greedy_share(
        self, prompts: list[list[int]], max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> list[list[int]]:
        keep = max(1, self.max_length - max_new_tokens)
        rows = [list(prompt[-keep:]) for prompt in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        order = [i for i in range(len(prompts)) if rows[i]]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            self._greedy_batch([rows[i] for i in batch], [new[i] for i in batch], max_new_tokens, stop)
        return new

    def _greedy_batch(
        self, rows: list[list[int]], new: list[list[int]], max_new_tokens: int, stop: Callable[[list[int]], bool]
    ) -> None:
        """Extends ``rows`` and ``new`` in place. The prompts go in once, left-padded, then one token a step
        through `IncrementalDecoder`'s cache while the batch fits max_length. Without a cache (``kv_cache``
        off, or a model the decoder cannot cache for), or past max_length (only when max_new_tokens reaches
        it: a cache cannot shift every position), each step is one forward over every row's last max_length
        tokens."""
        width = max(len(row) for row in rows)
        decoder = IncrementalDecoder(self.model, cache=self.kv_cache)
        ids = torch.tensor([[PAD_ID] * (width - len(row)) + row for row in rows])
        mask: torch.Tensor | None = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        active = [True] * len(rows)
        for step in range(max_new_tokens):
            if decoder.kind != "full" and width + step <= self.max_length:
                last = self._full_vocab(decoder.feed(ids, mask))[:, -1]  # (rows, vocab); gathered before slicing
            else:
                last = self._last_logits(rows)
            tokens = last.argmax(-1).tolist()
            for k, token in enumerate(tokens):
                if active[k]:
                    rows[k].append(token)
                    new[k].append(token)
                    active[k] = not stop(new[k])
            if not any(active):
                return
            ids, mask = torch.tensor(tokens)[:, None], None

    def _last_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """(rows, vocab): each row's next-token logits from one forward over its last max_length tokens."""
        logits = self.logits([row[-self.max_length :] for row in rows])
        return torch.stack([logits[k, min(len(row), self.max_length) - 1] for k, row in enumerate(rows)])


def _continuation_score(logits: torch.Tensor, row: list[int], targets: list[int]) -> tuple[float, bool]:
    """Score ``targets``, the tokens after the last ``len(targets)`` positions of ``row``."""
    positions = slice(len(row) - len(targets), len(row))
    predicted = torch.log_softmax(logits[positions], dim=-1)  # (targets, vocab)
    target_ids = torch.tensor(targets, device=logits.device)
    log_probs = predicted.gather(-1, target_ids[:, None]).squeeze(-1)
    greedy = bool((predicted.argmax(-1) == target_ids).all())
    return float(log_probs.double().sum()), greedy
