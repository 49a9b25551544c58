"""Corruptions of a true function body that keep it plausible code: the rejected responses of corpus preference
pairs (`plait.recipes.data.preferences`)."""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence

from plait.data.heldout import Function

CORRUPTIONS = ("swap", "operator", "other")
OTHER_NEAR = 8  # an `other` body is drawn among this many bodies each side of the function's length

# (pattern, replacement); the spaces keep unary minus, keyword arguments and `for x in` untouched.
_OPERATOR_FLIPS = (
    (r" == ", " != "),
    (r" != ", " == "),
    (r" <= ", " > "),
    (r" >= ", " < "),
    (r" < ", " >= "),
    (r" > ", " <= "),
    (r" \+ ", " - "),
    (r" - ", " + "),
    (r" and ", " or "),
    (r" or ", " and "),
    (r" is not ", " is "),
    (r"\bTrue\b", "False"),
    (r"\bFalse\b", "True"),
)
_INTEGER = re.compile(r"(?<![\w.])\d+(?![\w.])")


def swap_lines(body: str, rng: random.Random) -> str | None:
    """``body`` with two adjacent, different one-line statements of equal indentation exchanged (None if none)."""
    lines = body.splitlines()
    spots = [i for i in range(len(lines) - 1) if _swappable(lines[i], lines[i + 1])]
    if not spots:
        return None
    i = rng.choice(spots)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return "\n".join(lines) + "\n"


def _swappable(first: str, second: str) -> bool:
    return first != second and _indent(first) == _indent(second) and _is_simple(first) and _is_simple(second)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_simple(line: str) -> bool:
    """A whole one-line statement: it opens no block and leaves no bracket open (so a swap keeps it parseable)."""
    code = line.rstrip()
    opened = sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
    return not code.endswith((":", "\\")) and opened == 0


def flip_operator(body: str, rng: random.Random) -> str | None:
    """``body`` with one operator flipped or one integer constant changed (None if it has neither)."""
    edits = [(m.start(), m.end(), new) for pattern, new in _OPERATOR_FLIPS for m in re.finditer(pattern, body)]
    edits += [(m.start(), m.end(), str(int(m.group()) + 1)) for m in _INTEGER.finditer(body)]
    if not edits:
        return None
    start, end, new = rng.choice(sorted(edits))
    return body[:start] + new + body[end:]


class BodyPool:
    """The bodies ``other`` corruptions draw from, grouped by line count and sorted by length (a draw is a bisect)."""

    def __init__(self, functions: Sequence[Function]) -> None:
        groups: dict[int, set[str]] = {}
        for function in functions:
            groups.setdefault(function.body.count("\n"), set()).add(function.body)
        self._keys = {lines: sorted((len(body), body) for body in bodies) for lines, bodies in groups.items()}

    def near(self, body: str, *, each_side: int) -> list[str]:
        """The bodies of ``body``'s line count within ``each_side`` places of it in length order (not itself).

        By place, not by distance: where many bodies share a length, each body's neighbours differ."""
        keys = self._keys.get(body.count("\n"), [])
        at = bisect.bisect_left(keys, (len(body), body))
        window = keys[max(0, at - each_side) : at + each_side + 1]  # ``body`` itself sits at ``at`` if pooled
        return [other for _, other in window if other.strip() != body.strip()]


def other_body(
    function: Function, pool: Sequence[Function] | BodyPool, *, rng: random.Random, each_side: int = OTHER_NEAR
) -> str | None:
    """A body of ``pool`` with ``function``'s line count drawn at random among the ``each_side`` nearest in length
    on either side of it (never its own).

    Drawn per function, not the single nearest: the nearest was the same few common short bodies for many
    functions (one body was the rejected response of 47 training functions), so DPO learnt those bodies rather
    than the contrast."""
    pool = pool if isinstance(pool, BodyPool) else BodyPool(pool)
    candidates = pool.near(function.body, each_side=each_side)
    return rng.choice(candidates) if candidates else None


def corrupt(function: Function, kind: str, *, pool: Sequence[Function] | BodyPool, rng: random.Random) -> str | None:
    """``function``'s body corrupted by ``kind`` (one of CORRUPTIONS); None where that corruption does not apply."""
    if kind == "swap":
        rejected = swap_lines(function.body, rng)
    elif kind == "operator":
        rejected = flip_operator(function.body, rng)
    elif kind == "other":
        rejected = other_body(function, pool, rng=rng)
    else:
        raise ValueError(f"unknown corruption {kind!r}; use one of {', '.join(CORRUPTIONS)}")
    return rejected if rejected is not None and rejected.strip() != function.body.strip() else None
