"""PlaitLM against plait's own computations: rolling log-likelihood = minus the causal_lm loss sum,
a continuation's log-likelihood = minus its masked causal_lm loss, greedy generation = plait
generate's greedy sampler."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from plait.data.tokenizer import train_tokenizer
from plait.eval.adapter import PlaitLM
from plait.eval.scorer import Scorer
from plait.losses import causal_lm
from plait.models.gpt import GPT, GPTConfig
from plait.train.generate import sample

TEXT = "def add(a, b):\n    '''Sum of a and b.'''\n    return a + b\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def lm() -> PlaitLM:
    tokenizer = train_tokenizer([TEXT * 3, "x = [i * i for i in range(10)]\n"] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, max_seq_len=48, d_model=32, num_layers=2, num_heads=2))
    return PlaitLM(Scorer(model, max_length=48, batch_size=3), tokenizer, eot_id=0)


def requests(*args: tuple) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=a) for a in args]


def test_rolling_is_minus_the_causal_loss(lm: PlaitLM) -> None:
    ids = lm.encode(TEXT)
    assert len(ids) < 48
    batch = {"input_ids": torch.tensor([[0, *ids]]), "labels": torch.tensor([[0, *ids]])}
    with torch.no_grad():
        loss_sum, count = causal_lm(lm.scorer.model(input_ids=batch["input_ids"]), batch)
    (rolling,) = lm.loglikelihood_rolling(requests((TEXT,)))
    assert count == len(ids)
    assert math.isclose(rolling, -float(loss_sum), rel_tol=1e-5)


class RecordingScorer(Scorer):
    def score(self, pairs):  # type: ignore[no-untyped-def]
        self.pairs = list(pairs)
        return super().score(pairs)


def test_long_documents_score_every_token_once_within_the_context(lm: PlaitLM) -> None:
    text = TEXT * 6
    ids = lm.encode(text)
    assert len(ids) > 2 * 48
    recording = PlaitLM(RecordingScorer(lm.scorer.model, max_length=48), lm.tokenizer, eot_id=0)
    (whole,) = recording.loglikelihood_rolling(requests((text,)))
    pairs = recording.scorer.pairs
    assert [token for _, continuation in pairs for token in continuation] == ids
    assert all(len(context) + len(continuation) <= 48 + 1 for context, continuation in pairs)
    assert math.isclose(whole, sum(ll for ll, _ in lm.scorer.score(pairs)), rel_tol=1e-6)


def test_continuation_is_minus_its_masked_causal_loss(lm: PlaitLM) -> None:
    context, continuation = "x = [i", " * i for i in range(10)]"
    (ll, greedy), (ll_again, _) = lm.loglikelihood(requests((context, continuation), (context, continuation)))
    context_ids, continuation_ids = lm.encode(context), lm.encode(continuation)
    assert lm.encode(context + continuation) == context_ids + continuation_ids
    ids = torch.tensor([context_ids + continuation_ids])
    labels = torch.tensor([[-100] * len(context_ids) + continuation_ids])
    with torch.no_grad():
        logits = lm.scorer.model(input_ids=ids)
        loss_sum, count = causal_lm(logits, {"input_ids": ids, "labels": labels})
    expected_greedy = bool((logits[0, len(context_ids) - 1 : -1].argmax(-1) == labels[0, len(context_ids) :]).all())
    assert count == len(continuation_ids) and ll == ll_again and greedy == expected_greedy
    assert math.isclose(ll, -float(loss_sum), rel_tol=1e-5)


def test_greedy_generation_is_plait_generates(lm: PlaitLM) -> None:
    prompts = ["def add(a, b):\n", "x = [i", "print("]
    kwargs = {"until": ["\n\n\n"], "max_gen_toks": 12}
    outputs = lm.generate_until(requests(*((p, kwargs) for p in prompts)))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = lm.encode(prompt)
        expected = sample(lm.scorer.model, ids, max_new_tokens=12, temperature=0)[len(ids) :]
        text = lm.tokenizer.decode(expected).split("\n\n\n")[0]
        assert output == text, (prompt, output, text)


class CountingForwards:
    """Counts full forwards of ``model`` (GPT.decode, the cached path, runs none)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize(("max_length", "max_gen_toks"), [(48, 12), (16, 20)])  # (16, 20): slides past 16
def test_greedy_generation_with_the_cache_is_the_whole_row_recomputed(
    lm: PlaitLM, max_length: int, max_gen_toks: int
) -> None:
    """Prompts of different lengths share a batch (left-padded for the cache, right-padded without)."""
    prompts = ["def add(a, b):\n    '''Sum", "x = [i", "print(", "return a + b\n\n\nprint(add(1, 2))\n"]
    kwargs = {"until": ["\n\n\n"], "max_gen_toks": max_gen_toks}
    model = copy.deepcopy(lm.scorer.model)
    with torch.no_grad():  # far from init, where the next token depends on its position and past (not a repeat)
        for param in model.parameters():
            param.mul_(8)
    outputs, forwards = {}, {}
    for cache in (True, False):
        scorer = Scorer(model, max_length=max_length, batch_size=3, kv_cache=cache)
        counter = CountingForwards(scorer.model)
        outputs[cache] = PlaitLM(scorer, lm.tokenizer, eot_id=0).generate_until(
            requests(*((p, kwargs) for p in prompts))
        )
        forwards[cache] = counter.count
        counter.handle.remove()
    assert outputs[True] == outputs[False] and all(len(set(text)) > 4 for text in outputs[True]), outputs
    slides = max_gen_toks >= max_length
    assert (forwards[True] > 0) == slides and forwards[False] > 0, forwards  # the cache ran whenever it could
