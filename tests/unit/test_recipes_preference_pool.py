"""Corpus preference pairs' `other` corruption draws its rejected body per function (no one body rejected for
many functions), and the dev split of the training documents is disjoint from what is trained on."""

from __future__ import annotations

from collections import Counter

import pytest

from plait.data.heldout import Function, HeldOut
from plait.recipes.data.preferences import function_pairs, split_training_functions


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
