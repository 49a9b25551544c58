"""Corpus preference pairs' `other` corruption draws its rejected body per function (no one body rejected for
many functions), the dev split of the training documents is disjoint from what is trained on, and training pairs
may take undocumented functions (signature-only prompts, as held-out pairs have) without a held-out body."""

from __future__ import annotations

from collections import Counter

import pytest

from plait.data.heldout import Function, HeldOut
from plait.recipes.data.preferences import corpus_pairs, function_pairs, split_training_functions


def one_liners(count: int) -> list[Function]:
    """``count`` functions whose one-line bodies all have the same length (the ties the nearest body broke
    the same way for every function)."""
    return [Function(name=f"f{i}", header=f"def f{i}():\n", body=f"    return v{i:03d}\n") for i in range(count)]


def test_other_bodies_are_spread_over_the_pool() -> None:
    functions = [*one_liners(60), Function(name="g", header="def g():\n", body="    return a_longer_name\n")]
    pairs = [pair for pair in function_pairs(functions, per_function=3, seed=0) if pair.kind == "other"]
    assert len(pairs) == len(functions)
    uses = Counter(pair.rejected for pair in pairs)
    assert max(uses.values()) <= 6, uses.most_common(3)  # the single nearest body: 59 of 61
    assert len(uses) >= 30
    assert all(pair.rejected.count("\n") == pair.chosen.count("\n") != 0 for pair in pairs)
    assert all(pair.rejected != pair.chosen for pair in pairs)
    again = [pair for pair in function_pairs(functions, per_function=3, seed=0) if pair.kind == "other"]
    assert again == pairs  # seeded


def test_other_bodies_stay_near_in_length() -> None:
    functions = [
        Function(name=f"f{i}", header=f"def f{i}():\n", body="    return " + "x" * (i + 1) + "\n") for i in range(100)
    ]
    pairs = [pair for pair in function_pairs(functions, per_function=3, seed=1) if pair.kind == "other"]
    assert max(abs(len(pair.rejected) - len(pair.chosen)) for pair in pairs) <= 8


def test_dev_split_is_disjoint_from_the_training_functions() -> None:
    documents = [f'def f{i}(x):\n    """Doc {i}."""\n    y = x + {i}\n    return y\n' for i in range(40)]
    part = HeldOut(documents=(), train_text="\0".join(documents), split={})
    train, dev = split_training_functions(part, dev_fraction=0.1, seed=0)
    assert len(dev) == 4 and len(train) == 36
    assert not {f.body for f in train} & {f.body for f in dev}
    assert split_training_functions(part, dev_fraction=0.1, seed=0) == (train, dev)
    with pytest.raises(ValueError, match=r"dev_fraction=1\.0"):
        split_training_functions(part, dev_fraction=1.0)


TRAIN_DOCUMENT = '''
def documented(x):
    """Add one."""
    y = x + 1
    return y


def bare(a, b):
    c = a * b
    return c - 2


def copied(n):
    m = n // 3
    return m + 7
'''

HELD_DOCUMENT = """
def copied(n):
    m = n // 3
    return m + 7


def held(q):
    r = q ** 2
    return r
"""


def test_training_pairs_may_take_undocumented_functions_with_signature_prompts() -> None:
    part = HeldOut(documents=(HELD_DOCUMENT,), train_text=TRAIN_DOCUMENT, split={})
    default = corpus_pairs(split="train", per_function=3, part=part)
    every = corpus_pairs(split="train", per_function=3, part=part, documented_only=False)
    assert {pair.prompt for pair in default} == {'def documented(x):\n    """Add one."""\n'}
    assert {pair.prompt for pair in every} == {'def documented(x):\n    """Add one."""\n', "def bare(a, b):\n"}
    held_bodies = {pair.chosen for pair in corpus_pairs(split="heldout", part=part, documented_only=False)}
    assert held_bodies == {"    r = q ** 2\n    return r\n"}  # `copied` is in a training document: dropped
    assert not {pair.chosen for pair in every} & {"    m = n // 3\n    return m + 7\n", *held_bodies}


def test_dev_split_may_take_undocumented_functions() -> None:
    documents = [f"def f{i}(x):\n    y = x + {i}\n    return y\n" for i in range(40)]
    part = HeldOut(documents=(), train_text="\0".join(documents), split={})
    assert split_training_functions(part, dev_fraction=0.1, seed=0) == ([], [])
    train, dev = split_training_functions(part, dev_fraction=0.1, seed=0, documented_only=False)
    assert len(dev) == 4 and len(train) == 36
    assert all(f.header == f"def {f.name}(x):\n" for f in train + dev)
    assert not {f.body for f in train} & {f.body for f in dev}
