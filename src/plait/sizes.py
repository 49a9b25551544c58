"""Byte sizes as people write them ('16GiB', '40GB', '512MiB')."""

from __future__ import annotations

import re
from types import MappingProxyType

_UNITS = MappingProxyType(
    {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    | {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
)


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '40GB', '512MiB' or a plain number of bytes, as an int.

    >>> parse_bytes("80GiB")
    85899345920
    """
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write it like 80GiB, 40GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """A byte count for people: '1.50 GiB', '12.0 MiB', '512 B'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
