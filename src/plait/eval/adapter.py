"""plait models as an lm-evaluation-harness model: `PlaitLM` implements lm_eval's ``LM`` interface.

lm_eval sees one process (rank 0 of world 1) on every rank: each rank builds the same requests and
aggregates the same results, while the `Scorer` underneath shares the model's work over the plan's
dp ranks (and runs tensor-parallel peers together). Only the main rank writes anything.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from plait.eval.scorer import Pair, Scorer

DEFAULT_MAX_GEN_TOKS = 64


class PlaitLM(LM):
    """An lm_eval model over a `Scorer` and its tokenizer (``eot_id`` starts a rolling document).

    Example::

        lm = PlaitLM(Scorer(model, max_length=128), tokenizer, eot_id=0)
        lm_eval.simple_evaluate(model=lm, tasks=[...])
    """

    def __init__(self, scorer: Scorer, tokenizer: Tokenizer, *, eot_id: int) -> None:
        super().__init__()
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.eot_id = eot_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _pair(self, context: str, continuation: str) -> Pair:
        """As lm_eval's HF model: encode the whole, so a merge across the boundary stays the continuation's."""
        if not context:
            return [self.eot_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        num_context = min(len(self.encode(context)), len(whole) - 1)  # the continuation keeps a token
        return whole[:num_context], whole[num_context:]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # each distinct request once: plait_code_choice asks a body's unconditional score in every row whose pool holds it
        unique = list(dict.fromkeys(tuple(request.args) for request in requests))
        scores = dict(zip(unique, self.scorer.score([self._pair(*args) for args in unique]), strict=True))
        return [scores[tuple(request.args)] for request in requests]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document in disjoint windows of the scorer's max_length, the first preceded by end-of-text."""
        windows: list[Pair] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            rolling = get_rolling_token_windows(
                token_list=self.encode(request.args[0]),
                prefix_token=self.eot_id,
                max_seq_len=self.scorer.max_length,
                context_len=1,
            )
            for window in map(make_disjoint_window, rolling):
                windows.append((list(window[0]), list(window[1])))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.scorer.score(windows), strict=True):
            totals[owner] += log_prob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (plait eval's tasks are exact-match) until a stop string or max_gen_toks."""
        results: list[str | None] = [None] * len(requests)
        for kwargs_key, indices in _by_kwargs(requests).items():
            until, max_new = kwargs_key
            prompts = [self.encode(requests[i].args[0]) or [self.eot_id] for i in indices]
            outputs = self.scorer.greedy(prompts, max_new_tokens=max_new, stop=lambda ids, u=until: self._stops(ids, u))
            for i, ids in zip(indices, outputs, strict=True):
                results[i] = _cut(self.tokenizer.decode(ids), until)
        return [text or "" for text in results]

    def _stops(self, ids: list[int], until: tuple[str, ...]) -> bool:
        return bool(ids) and (ids[-1] == self.eot_id or any(stop in self.tokenizer.decode(ids) for stop in until))


def _by_kwargs(requests: list[Any]) -> dict[tuple[tuple[str, ...], int], list[int]]:
    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for index, request in enumerate(requests):
        kwargs = dict(request.args[1]) if len(request.args) > 1 else {}
        until = kwargs.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        key = (until, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
        groups.setdefault(key, []).append(index)
    return groups


def _cut(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
