"""One syntax for a plan: `plait.Plan`'s own field names as space-separated KEY=VALUE pairs.

    >>> plan = parse_plan("dp=64 tp=8 pp=16 zero=1 pp_schedule=interleaved pp_chunks=4 recompute=none microbatches=64")
    >>> (plan.dp, plan.pp_chunks)
    (64, 4)
    >>> plan_string(plan)
    'dp=64 tp=8 pp=16 zero=1 microbatches=64 recompute=none pp_schedule=interleaved pp_chunks=4'

The degrees, the ZeRO stage, the micro-batch count and the recomputation must be written (`REQUIRED`):
a plan string says what will run, never leaves it to a default. Every other field keeps Plan's default.
List fields take commas (`pp_split=7,8,8,7`, `recompute_modules=attention,mlp`); booleans true/false;
dp=-1 infers dp from the world size. `plait plan --plan` evaluates such a plan, `plait train --plan`
trains with it, and `plan_string` writes any Plan back in the same syntax.
"""

from __future__ import annotations

import dataclasses
import typing

from plait.config import Plan

REQUIRED = ("dp", "tp", "pp", "zero", "microbatches", "recompute")
EXAMPLE = "dp=64 tp=8 pp=16 zero=1 pp_schedule=interleaved pp_chunks=4 recompute=none microbatches=64"
_LISTS = {"pp_split": int, "recompute_modules": str}


def _keys() -> list[str]:
    return [field.name for field in dataclasses.fields(Plan)]


def _typed(key: str, text: str, kind: object) -> object:
    if key in _LISTS:
        try:
            return [_LISTS[key](item) for item in text.split(",") if item]
        except ValueError:
            raise ValueError(
                f"plan string {key}={text}: a comma-separated list of integers, e.g. {key}=7,8,8,7"
            ) from None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"plan string {key}={text}: write true or false")
        return text.lower() == "true"
    if kind in (int, float):
        try:
            return kind(text)  # type: ignore[operator]
        except ValueError:
            raise ValueError(
                f"plan string {key}={text}: expected {'an integer' if kind is int else 'a number'}"
            ) from None
    if kind == (int | str):
        return int(text) if text.lstrip("-").isdigit() else text
    return text


def parse_fields(text: str) -> dict[str, object]:
    """The KEY=VALUE pairs of a plan string, typed as Plan's fields; unknown, repeated or missing keys are
    refused in one line that names them and the valid keys."""
    types = typing.get_type_hints(Plan)
    pairs = [item.partition("=") for item in text.split()]
    malformed = [key + sep + value for key, sep, value in pairs if not sep or not key or not value]
    unknown = [key for key, sep, _ in pairs if sep and key not in types]
    keys = [key for key, _, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    missing = [key for key in REQUIRED if key not in keys]
    problems = [f"not KEY=VALUE: {' '.join(malformed)}"] * bool(malformed)
    problems += [f"unknown key(s): {', '.join(unknown)}"] * bool(unknown)
    problems += [f"repeated key(s): {', '.join(repeated)}"] * bool(repeated)
    problems += [f"missing key(s): {', '.join(missing)}"] * bool(missing)
    if problems:
        raise ValueError(
            f"plan string {text!r}: {'; '.join(problems)} (required: {' '.join(REQUIRED)}; valid keys: "
            f'{" ".join(_keys())}; e.g. "{EXAMPLE}")'
        )
    return {key: _typed(key, value, types[key]) for key, _, value in pairs}


def parse_plan(text: str) -> Plan:
    """A plan string as a validated Plan (Plan's own checks say what is wrong with a value)."""
    return Plan(**parse_fields(text))  # type: ignore[arg-type]


def plan_string(plan: Plan) -> str:
    """`plan` in the plan-string syntax: the required keys, then every field that differs from its default."""
    default = Plan()
    items = []
    for key in REQUIRED + tuple(k for k in _keys() if k not in REQUIRED):
        value = getattr(plan, key)
        if key in REQUIRED or value != getattr(default, key):
            items.append(f"{key}={_text(value)}")
    return " ".join(items)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)
