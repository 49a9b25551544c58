"""Type checks of config values against the config dataclasses' annotations.

TOML and `--set` hand over whatever the user wrote (`steps = "ten"`, `lr = inf`); each value is
checked against its field's annotation before the dataclass sees it, so a wrong type is refused
with the field, the type it takes and an example, not with a TypeError from a comparison.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}


def type_name(kind: Any) -> str:
    """How a field's annotation reads to a user: list[int] -> 'a list of integers'."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args if arg is not type(None)) + (
            " (or left out)" if type(None) in args else ""
        )
    if origin is list:
        return f"a list of {type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a table"
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def matches(value: Any, kind: Any) -> bool:
    """Whether `value` (as TOML parses it) fits the annotation `kind`; bools are not numbers."""
    if kind is Any:
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if kind is type(None):
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _shown(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, str | list):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else repr(value)


def checked_value(where: str, value: Any, kind: Any, *, example: Any) -> Any:
    """`value` for the field `where` (section.key) of annotation `kind`: ints widened to float for a
    float field; ValueError naming the field, the type it takes and an example when it does not fit,
    and for a float that is not finite (inf, nan)."""
    if not matches(value, kind):
        got = (
            "a list" if isinstance(value, list) else "a boolean" if isinstance(value, bool) else type_name(type(value))
        )
        raise ValueError(
            f"{where}={_shown(value)} is {got}, but {where} takes {type_name(kind)}; "
            f"write it like {where}={_shown(example)}"
        )
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}={value}: give a finite number, e.g. {where}={_shown(example)}")
    return value
