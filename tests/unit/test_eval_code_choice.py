"""plait eval's code-choice task: which held-out functions it takes and how its distractors are drawn."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

from plait.data.heldout import Function, HeldOut, held_out_functions
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
    assert row["choices"][row["label"]] == bodies["true"]
    assert sorted(row["choices"]) == sorted([bodies["true"], bodies["four_1"], bodies["four_2"], bodies["four_3"]])


def test_rows_of_one_length_draw_their_own_distractors() -> None:
    words = [f"w{i}" for i in range(10)]
    pool = [Function(name=w, header=f"def {w}():\n", body=f"{w} {w}\n") for w in words]  # all 2 tokens
    rows = choice_rows(pool, pool=pool, tokenizer=_word_tokenizer(words), sizes=TaskSizes())
    used = {c for row in rows for i, c in enumerate(row["choices"]) if i != row["label"]}
    assert len(used) >= 8  # a shared tie-break would give every row the same 3 (4 counting its own)
