"""plait eval's code-choice task: which held-out functions it takes and how its distractors are drawn."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from plait.data.heldout import Function, HeldOut, held_out_functions
from plait.eval.choice_pool import expected_accuracy, pairwise_accuracy, process_results
from plait.eval.taskdata import TaskSizes, choice_rows

DOCUMENT = '''
def documented(a, b):
    """Add them."""
    total = a + b
    return total


def plain(first,
          second):
    # a comment above the body stays in the header
    return first * second


def one_line(x): return x


def copied(y):
    return y - 12345
'''


def _part() -> HeldOut:
    return HeldOut(documents=(DOCUMENT,), train_text="def other(y):\n    return y - 12345\n", split={})


def test_undocumented_functions_join_with_their_signature_as_header() -> None:
    assert [f.name for f in held_out_functions(_part())] == ["documented"]  # the default, as recipes read it
    functions = {f.name: f for f in held_out_functions(_part(), documented_only=False)}
    assert set(functions) == {"documented", "plain"}  # one_line has no body below it; copied's body is trained on
    assert functions["documented"].header == 'def documented(a, b):\n    """Add them."""\n'
    assert (
        functions["plain"].header
        == "def plain(first,\n          second):\n    # a comment above the body stays in the header\n"
    )
    assert functions["plain"].body == "    return first * second\n"


def _word_tokenizer(words: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_distractors_match_the_true_body_in_tokens_not_characters() -> None:
    bodies = {
        "true": "a b c d\n",  # 4 tokens, 8 characters
        "same_chars": "abcdefg\n",  # 1 token, 8 characters: the nearest by characters, not by tokens
        "four_1": "aa bb cc dd\n",
        "four_2": "aaa bbb ccc ddd\n",
        "four_3": "aaaa bbbb cccc dddd\n",
    }
    pool = [Function(name=name, header=f"def {name}():\n", body=body) for name, body in bodies.items()]
    tokenizer = _word_tokenizer(sorted({w for body in bodies.values() for w in body.split()}))
    (row,) = choice_rows(pool[:1], pool=pool, tokenizer=tokenizer, sizes=TaskSizes())
    assert row["choices"][row["label"]] == bodies["true"] and row["label"] < row["single_draw"] == 4
    single = sorted(row["choices"][:4])
    assert single == sorted([bodies["true"], bodies["four_1"], bodies["four_2"], bodies["four_3"]])
    assert row["choices"][4:] == [bodies["same_chars"]]  # the rest of the pool, after the single draw


def test_rows_of_one_length_draw_their_own_distractors() -> None:
    words = [f"w{i}" for i in range(10)]
    pool = [Function(name=w, header=f"def {w}():\n", body=f"{w} {w}\n") for w in words]  # all 2 tokens
    rows = choice_rows(pool, pool=pool, tokenizer=_word_tokenizer(words), sizes=TaskSizes())
    used = {c for row in rows for i, c in enumerate(row["choices"]) if i != row["label"]}
    assert len(used) >= 8  # a shared tie-break would give every row the same 3 (4 counting its own)


def test_the_pool_is_the_nearest_bodies_in_tokens_after_the_single_draw() -> None:
    words = [f"w{i}" for i in range(40)]
    pool = [Function(name=w, header=f"def {w}():\n", body=" ".join(words[: i + 1]) + "\n") for i, w in enumerate(words)]
    tokens = {f.body: i + 1 for i, f in enumerate(pool)}
    sizes = TaskSizes(pool_distractors=7)
    rows = choice_rows(pool, pool=pool, tokenizer=_word_tokenizer(words), sizes=sizes)
    assert len(rows) == len(pool)
    for function, row in zip(pool, rows, strict=True):
        length = tokens[function.body]
        others = [c for i, c in enumerate(row["choices"]) if i != row["label"]]
        assert len(row["choices"]) == 8 and row["choices"][row["label"]] == function.body
        distances = [abs(tokens[c] - length) for c in others]
        farthest_kept = max(distances)
        assert all(abs(tokens[f.body] - length) >= farthest_kept for f in pool if f.body not in row["choices"])
        assert max(distances[:3]) <= min(distances[3:])  # the single draw takes the nearest 3


def _lm_eval_draws(true_score: float, distractors: list[float], *, num_drawn: int) -> float:
    """lm-eval's argmax (the first of tied maxima) over every draw of distractors in every order of the choices."""
    outcomes = []
    for drawn in itertools.combinations(distractors, num_drawn):
        for order in itertools.permutations(range(num_drawn + 1)):
            scores = [([true_score, *drawn])[i] for i in order]
            outcomes.append(float(order[int(np.argmax(scores))] == 0))
    return float(np.mean(outcomes))


@pytest.mark.parametrize("seed", range(40))
def test_expected_accuracy_is_lm_eval_over_every_draw_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    pool_size = rng.randint(3, 9)
    distractors = [float(rng.randint(0, 4)) for _ in range(pool_size)]  # few values: ties in most draws
    true_score = float(rng.randint(0, 4))
    for num_drawn in range(1, min(pool_size, 4) + 1):
        expected = expected_accuracy(true_score, distractors, num_drawn=num_drawn)
        assert expected == pytest.approx(_lm_eval_draws(true_score, distractors, num_drawn=num_drawn), abs=1e-12)


def test_expected_accuracy_known_values() -> None:
    assert expected_accuracy(1.0, [0.0] * 4 + [2.0] * 11, num_drawn=3) == pytest.approx(4 / 455)  # C(4,3)/C(15,3)
    assert expected_accuracy(1.0, [1.0, 1.0, 1.0], num_drawn=3) == pytest.approx(1 / 4)  # all tied: chance
    assert pairwise_accuracy(1.0, [0.0, 1.0, 2.0, 0.5]) == pytest.approx((2 + 0.5) / 4)
    with pytest.raises(ValueError, match="need 1 <= draw <= pool"):
        expected_accuracy(1.0, [0.0, 0.0], num_drawn=3)


def test_process_results_scores_the_single_draw_as_lm_eval_and_the_pool_in_expectation() -> None:
    choices = ["a\n", "bb\n", "ccc\n", "dddd\n", "e\n", "ff\n"]
    doc = {"choices": choices, "label": 1, "single_draw": 4}
    conditional = [-5.0, -4.0, -3.0, -9.0, -6.0, -1.0]  # plain acc: the true (index 1) loses to index 2
    unconditional = [-9.0, -8.0, -2.0, -9.5, -1.0, -0.5]  # mutual info: 4.0, 4.0, -1.0, 0.5, -5.0, -0.5
    results = [(ll, False) for ll in conditional + unconditional]
    metrics = process_results(doc, results)
    assert metrics["acc"] == 0.0 and metrics["acc_mutual_info"] == 0.0  # a tie with index 0: argmax takes the first
    lengths = np.array([len(c) for c in choices[:4]], dtype=float)
    assert metrics["acc_norm"] == float(np.argmax(np.array(conditional[:4]) / lengths) == 1)
    mutual = [c - u for c, u in zip(conditional, unconditional, strict=True)]
    others = [m for i, m in enumerate(mutual) if i != 1]
    assert metrics["acc_mutual_info_pool4"] == pytest.approx(_lm_eval_draws(mutual[1], others, num_drawn=3))
    assert metrics["acc_mutual_info_pair"] == pytest.approx((4 + 0.5) / 5)
    assert metrics["acc_pool4"] == pytest.approx(_lm_eval_draws(-4.0, [-5.0, -3.0, -9.0, -6.0, -1.0], num_drawn=3))
    assert metrics["acc_pair"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="acc_mutual_info"):
        process_results(doc, results[:6])
